#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it:
# Debian packages (Chromium for the page, nginx, systemd's analyzer, openssl,
# Node.js for the client's unit tests, redis-server for the broker tests; the
# tests start their own, never the system service), a virtual environment of
# the tests' own in .venv-test with the package (editable) and its test extra,
# then ruff, mypy, node --test, the RFC 6455/7692 conformance job over ws://
# and wss:// (scripts/conformance.sh; SKIP_CONFORMANCE=1 skips it) and pytest.
# .venv, the README's install, is never touched: a demo server running from it
# keeps running.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=()
command -v chromium >/dev/null || packages+=(chromium)
[ -x /usr/sbin/nginx ] || packages+=(nginx-light)
command -v systemd-analyze >/dev/null || packages+=(systemd)
command -v openssl >/dev/null || packages+=(openssl)
command -v node >/dev/null || packages+=(nodejs)
command -v ps >/dev/null || packages+=(procps)
# Autobahn|TestSuite's private build (scripts/autobahn/build.sh) unpacks
# Debian's Python 2.7 packages with dpkg and compiles wsaccel when it can.
command -v gcc >/dev/null || packages+=(gcc)
dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'ok installed' \
    || packages+=(python3-venv)
# The Sentinel tests run the same binary as `redis-server CONF --sentinel`
# (Debian's redis-sentinel package only adds a service for it).
[ -x /usr/bin/redis-server ] || packages+=(redis-server)
if [ ${#packages[@]} -gt 0 ]; then
    echo "== apt-get install ${packages[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        -o DPkg::Lock::Timeout=600 "${packages[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
VENV=.venv-test
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
echo "== pip install -e .[test,bench] into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e '.[test,bench]'

echo "== ruff"
"$VENV/bin/ruff" check wsserver tests bench examples
echo "== mypy"
"$VENV/bin/mypy" wsserver
echo "== node --test"
node --test tests/js/
if [ "${SKIP_CONFORMANCE:-0}" != 1 ]; then
    # Sections 1-13 (517 cases, permessage-deflate included) over ws:// and
    # over wss://, both on the same frame layer. The two runs go side by side:
    # each is mostly its own fuzzing client's CPU, so on two cores this halves
    # the wait (about six minutes instead of twelve).
    echo "== conformance (Autobahn|TestSuite, sections 1-13, ws:// and wss:// side by side)"
    PYTHON="$VENV/bin/python" scripts/autobahn/build.sh >/dev/null  # once, before the two runs share it
    tls=build/conformance-tls
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
    PYTHON="$VENV/bin/python" scripts/conformance.sh --exclude '' --min-cases 517 \
        build/conformance-ws > build/conformance-ws.out 2>&1 &
    ws_job=$!
    PYTHON="$VENV/bin/python" scripts/conformance.sh --exclude '' --min-cases 517 \
        --scheme wss --certfile "$tls/cert.pem" --keyfile "$tls/key.pem" \
        --cafile "$tls/cert.pem" build/conformance-wss > build/conformance-wss.out 2>&1 &
    wss_job=$!
    ws_status=0; wait "$ws_job" || ws_status=$?
    wss_status=0; wait "$wss_job" || wss_status=$?
    echo "-- ws://";  cat build/conformance-ws.out
    echo "-- wss://"; cat build/conformance-wss.out
    if [ "$ws_status" != 0 ] || [ "$wss_status" != 0 ]; then
        echo "conformance failed (ws:// exit $ws_status, wss:// exit $wss_status)" >&2
        exit 1
    fi
fi
echo "== pytest"
"$VENV/bin/python" -m pytest -q "$@"
