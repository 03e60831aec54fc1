#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine, then run it:
# Debian packages (Chromium for the page, nginx, systemd's analyzer, openssl,
# Node.js for the client's unit tests, redis-server for the broker tests; the
# tests start their own, never the system service), a virtual environment in
# .venv with the package and its test extra, then ruff, mypy, node --test, the
# RFC 6455 conformance job (scripts/conformance.sh; SKIP_CONFORMANCE=1 skips it)
# and pytest.
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
# Autobahn|TestSuite's private build (scripts/conformance.sh) downloads its
# Python 2.7 wheels with the system pip, and compiles wsaccel when it can.
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
command -v gcc >/dev/null || packages+=(gcc)
[ -x /usr/bin/redis-server ] || packages+=(redis-server)
if [ ${#packages[@]} -gt 0 ]; then
    echo "== apt-get install ${packages[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        -o DPkg::Lock::Timeout=600 "${packages[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "== pip install -e .[test,bench]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'

echo "== ruff"
.venv/bin/ruff check wsserver tests bench examples
echo "== mypy"
.venv/bin/mypy wsserver
echo "== node --test"
node --test tests/js/
if [ "${SKIP_CONFORMANCE:-0}" != 1 ]; then
    echo "== conformance (Autobahn|TestSuite, sections 1-13, ws:// and wss://)"
    scripts/conformance.sh
    SCHEME=wss scripts/conformance.sh
fi
echo "== pytest"
.venv/bin/python -m pytest -q "$@"
