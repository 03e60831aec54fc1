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
    # over wss://, both on the same frame layer.
    echo "== conformance (Autobahn|TestSuite, sections 1-13, ws://)"
    PYTHON="$VENV/bin/python" scripts/conformance.sh --exclude '' --min-cases 517 \
        build/conformance-ws
    echo "== conformance (Autobahn|TestSuite, sections 1-13, wss://)"
    tls=build/conformance-tls
    mkdir -p "$tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null
    PYTHON="$VENV/bin/python" scripts/conformance.sh --exclude '' --min-cases 517 \
        --scheme wss --certfile "$tls/cert.pem" --keyfile "$tls/key.pem" \
        --cafile "$tls/cert.pem" build/conformance-wss
fi
echo "== pytest"
"$VENV/bin/python" -m pytest -q "$@"
