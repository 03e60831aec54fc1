#!/usr/bin/env bash
# RFC 6455 conformance of wsserver's own frame layer: builds Autobahn|TestSuite
# privately (../shared/tools/autobahn/setup.sh, beside the checkout), starts
# tests/conformance/echo_server.py on a free port, runs the fuzzingclient on
# sections 1-10 (12.* and 13.*, permessage-deflate, are not offered), and fails
# on any FAILED case or more than 4 NON-STRICT.
#   scripts/conformance.sh [OUTDIR]      (default: build/conformance)
# Environment: PYTHON (default .venv/bin/python), AUTOBAHN_TOOLS (default
# ../shared/tools/autobahn), AB_HOME (where the suite is built), MAX_NON_STRICT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
TOOLS="${AUTOBAHN_TOOLS:-$ROOT/../shared/tools/autobahn}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUTDIR="${1:-$ROOT/build/conformance}"
MAX_NON_STRICT="${MAX_NON_STRICT:-4}"
mkdir -p "$(dirname "$OUTDIR")"

if [ ! -x "$TOOLS/setup.sh" ]; then
    echo "conformance: no Autobahn tools at $TOOLS (set AUTOBAHN_TOOLS)" >&2
    exit 2
fi
echo "== autobahn setup"
"$TOOLS/setup.sh" --no-selftest | tail -n 1

port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== echo server on 127.0.0.1:$port"
"$PYTHON" -m tests.conformance.echo_server --port "$port" > "$OUTDIR.server.log" 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    "$PYTHON" -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()" \
        2>/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$OUTDIR.server.log" >&2; exit 1; }
    sleep 0.1
done

rm -rf "$OUTDIR"
echo "== fuzzingclient, sections 1-10"
"$TOOLS/run.sh" "ws://127.0.0.1:$port/" wsserver-fastpath "$OUTDIR" '*' '12.*,13.*' >/dev/null || true
"$PYTHON" "$TOOLS/summarize.py" "$OUTDIR" --list FAILED,NON-STRICT | tee "$OUTDIR/summary.txt"

"$PYTHON" - "$OUTDIR/index.json" "$MAX_NON_STRICT" <<'PY'
import collections, json, sys
index = json.load(open(sys.argv[1]))
counts = collections.Counter(r["behavior"] for agent in index.values() for r in agent.values())
total = sum(counts.values())
print("conformance: %d cases: %s" % (total, ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
bad = counts["FAILED"] > 0 or counts["NON-STRICT"] > int(sys.argv[2]) or total < 301
sys.exit(1 if bad else 0)
PY
