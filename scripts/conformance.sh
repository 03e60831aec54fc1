#!/usr/bin/env bash
# RFC 6455 conformance of wsserver's frame layer with Autobahn|TestSuite.
#
#   scripts/conformance.sh [options] [OUTDIR]        (OUTDIR default: build/conformance)
#
# Builds the suite privately (scripts/autobahn/build.sh, cached in
# ~/.cache/wsserver-autobahn), starts tests/conformance/echo_server.py on a
# free port (unless --url names a server already running), runs the
# fuzzingclient, and fails on any FAILED case, on more NON-STRICT cases than
# allowed, or when fewer cases ran than expected.
#
# Options (the defaults are the job `scripts/test.sh` runs: sections 1-10 on ws://):
#   --cases PATS        case patterns to run, comma-separated (default '*')
#   --exclude PATS      case patterns to leave out (default '12.*,13.*': the
#                       permessage-deflate sections; --exclude '' runs 1-13)
#   --scheme ws|wss     the URL scheme (default ws); wss starts the echo server
#                       with --certfile/--keyfile
#   --certfile F, --keyfile F   the echo server's TLS pair (with --scheme wss)
#   --cafile F          the CA the suite verifies the server's certificate with
#                       (for the name given by --hostname, default localhost);
#                       without it a wss:// run does not verify the certificate
#   --hostname NAME     the TLS server name sent and verified (default localhost)
#   --url URL           test this server instead of starting the echo server
#   --agent NAME        the name in the reports (default wsserver-framelayer)
#   --max-non-strict N  NON-STRICT cases allowed (default 4)
#   --min-cases N       fewer cases run is a failure (default 301 for sections
#                       1-10, else 1)
# Environment: PYTHON (default .venv-test/bin/python, made when missing),
# WSSERVER_AUTOBAHN_HOME (where the suite is built).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

CASES='*'
EXCLUDE='12.*,13.*'
SCHEME=ws
CERTFILE="" KEYFILE="" CAFILE="" HOSTNAME_TLS=localhost URL="" AGENT=wsserver-framelayer
MAX_NON_STRICT=4
MIN_CASES=""
OUTDIR="$ROOT/build/conformance"
while [ $# -gt 0 ]; do
    case "$1" in
        --cases) CASES=$2; shift ;;
        --exclude) EXCLUDE=$2; shift ;;
        --scheme) SCHEME=$2; shift ;;
        --certfile) CERTFILE=$(realpath "$2"); shift ;;
        --keyfile) KEYFILE=$(realpath "$2"); shift ;;
        --cafile) CAFILE=$(realpath "$2"); shift ;;
        --hostname) HOSTNAME_TLS=$2; shift ;;
        --url) URL=$2; shift ;;
        --agent) AGENT=$2; shift ;;
        --max-non-strict) MAX_NON_STRICT=$2; shift ;;
        --min-cases) MIN_CASES=$2; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) echo "conformance: unknown option $1" >&2; exit 2 ;;
        *) OUTDIR=$(realpath -m "$1") ;;
    esac
    shift
done
case "$SCHEME" in ws|wss) ;; *) echo "conformance: --scheme is ws or wss" >&2; exit 2 ;; esac
if [ -z "$MIN_CASES" ]; then
    if [ "$CASES" = '*' ] && [ "$EXCLUDE" = '12.*,13.*' ]; then MIN_CASES=301; else MIN_CASES=1; fi
fi
if [ -z "${PYTHON:-}" ]; then
    PYTHON="$ROOT/.venv-test/bin/python"
    if [ ! -x "$PYTHON" ]; then
        # A fresh clone: the tests' venv, as scripts/test.sh makes it.
        echo "== creating .venv-test"
        python3 -m venv "$ROOT/.venv-test"
        "$PYTHON" -m pip install -q -e "$ROOT[test,bench]"
    fi
fi

echo "== Autobahn|TestSuite (scripts/autobahn/build.sh)"
WSTEST=$(PYTHON="$PYTHON" scripts/autobahn/build.sh)

mkdir -p "$(dirname "$OUTDIR")"
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [ -z "$URL" ]; then
    server_args=()
    if [ "$SCHEME" = wss ]; then
        if [ -z "$CERTFILE" ] || [ -z "$KEYFILE" ]; then
            echo "conformance: --scheme wss needs --certfile and --keyfile (or --url)" >&2
            exit 2
        fi
        server_args=(--certfile "$CERTFILE" --keyfile "$KEYFILE")
    fi
    port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$PYTHON" -m tests.conformance.echo_server --port "$port" "${server_args[@]}" \
        > "$OUTDIR/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 100); do
        "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" \
            2>/dev/null && break
        kill -0 "$server_pid" 2>/dev/null || { cat "$OUTDIR/server.log" >&2; exit 1; }
        sleep 0.1
    done
    host=127.0.0.1
    [ "$SCHEME" = wss ] && host=$HOSTNAME_TLS
    URL="$SCHEME://$host:$port/"
    echo "== echo server on $URL"
fi

spec_args=(--agent "$AGENT" --cases "$CASES" --exclude "$EXCLUDE")
tls_env=()
if [ -n "$CAFILE" ]; then
    spec_args+=(--hostname "$HOSTNAME_TLS")
    # The suite's TLS (pyOpenSSL) verifies against OpenSSL's default store,
    # which this variable replaces.
    tls_env=(SSL_CERT_FILE="$CAFILE")
fi
"$PYTHON" scripts/autobahn/suite.py spec "$URL" "$OUTDIR" "${spec_args[@]}" > "$OUTDIR/spec.json"

echo "== fuzzingclient: cases '$CASES', excluding '$EXCLUDE', on $URL"
started=$(date +%s)
rc=0
(cd "$OUTDIR" && env "${tls_env[@]}" "$WSTEST" -m fuzzingclient -s spec.json) \
    > "$OUTDIR/wstest.log" 2>&1 || rc=$?
echo "== fuzzingclient: exit $rc after $(( $(date +%s) - started )) s (log: $OUTDIR/wstest.log)"
if [ ! -f "$OUTDIR/index.json" ]; then
    tail -n 20 "$OUTDIR/wstest.log" >&2
    echo "conformance: no report in $OUTDIR" >&2
    exit 1
fi
"$PYTHON" scripts/autobahn/suite.py report "$OUTDIR" \
    --max-non-strict "$MAX_NON_STRICT" --min-cases "$MIN_CASES" | tee "$OUTDIR/summary.txt"
exit "${PIPESTATUS[0]}"
