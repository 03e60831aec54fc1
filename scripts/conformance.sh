#!/usr/bin/env bash
# RFC 6455 and RFC 7692 conformance of wsserver's own frame layer: builds
# Autobahn|TestSuite privately (../shared/tools/autobahn/setup.sh, beside the
# checkout), starts tests/conformance/echo_server.py on a free port (over TLS
# with SCHEME=wss, with a self-signed certificate made here), runs the
# fuzzingclient on sections 1-13 (517 cases, permessage-deflate included), and
# fails on any FAILED case, more than MAX_NON_STRICT NON-STRICT, or fewer cases.
#   scripts/conformance.sh [OUTDIR]      (default: build/conformance-$SCHEME)
# Environment: SCHEME (ws or wss, default ws), CASES and EXCLUDE (Autobahn case
# patterns, default all and none), PYTHON (default .venv/bin/python),
# AUTOBAHN_TOOLS (default ../shared/tools/autobahn), AB_HOME (where the suite
# is built), MAX_NON_STRICT, MIN_CASES (default 517 for all cases, else 1).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TOOLS="${AUTOBAHN_TOOLS:-$ROOT/../shared/tools/autobahn}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
SCHEME="${SCHEME:-ws}"
CASES="${CASES:-*}"
EXCLUDE="${EXCLUDE:-}"
OUTDIR="${1:-$ROOT/build/conformance-$SCHEME}"
MAX_NON_STRICT="${MAX_NON_STRICT:-4}"
if [ -z "${MIN_CASES:-}" ]; then
    if [ "$CASES" = '*' ] && [ -z "$EXCLUDE" ]; then MIN_CASES=517; else MIN_CASES=1; fi
fi
case "$SCHEME" in ws|wss) ;; *) echo "conformance: SCHEME is ws or wss" >&2; exit 2 ;; esac
mkdir -p "$(dirname "$OUTDIR")"

if [ ! -x "$TOOLS/setup.sh" ]; then
    echo "conformance: no Autobahn tools at $TOOLS (set AUTOBAHN_TOOLS)" >&2
    exit 2
fi
echo "== autobahn setup"
"$TOOLS/setup.sh" --no-selftest | tail -n 1

tls_args=()
if [ "$SCHEME" = wss ]; then
    tls="$OUTDIR.tls"
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost \
        -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
    tls_args=(--certfile "$tls/cert.pem" --keyfile "$tls/key.pem")
fi

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== echo server on $SCHEME://127.0.0.1:$port"
"$PYTHON" -m tests.conformance.echo_server --port "$port" "${tls_args[@]}" \
    > "$OUTDIR.server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" \
        2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$OUTDIR.server.log" >&2; exit 1; }
    sleep 0.1
done

rm -rf "$OUTDIR"
echo "== fuzzingclient over $SCHEME://, cases '$CASES' except '$EXCLUDE'"
"$TOOLS/run.sh" "$SCHEME://127.0.0.1:$port/" "wsserver-$SCHEME" "$OUTDIR" "$CASES" "$EXCLUDE" \
    >/dev/null || true
"$PYTHON" "$TOOLS/summarize.py" "$OUTDIR" --list FAILED,NON-STRICT | tee "$OUTDIR/summary.txt"

"$PYTHON" - "$OUTDIR/index.json" "$MAX_NON_STRICT" "$MIN_CASES" "$SCHEME" <<'PY'
import collections, json, sys
index = json.load(open(sys.argv[1]))
counts = collections.Counter(r["behavior"] for agent in index.values() for r in agent.values())
total = sum(counts.values())
print("conformance (%s): %d cases: %s" % (
    sys.argv[4], total, ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
bad = counts["FAILED"] > 0 or counts["NON-STRICT"] > int(sys.argv[2]) or total < int(sys.argv[3])
sys.exit(1 if bad else 0)
PY
