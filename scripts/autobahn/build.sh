#!/usr/bin/env bash
# Build Autobahn|TestSuite (`wstest`, Python 2.7 only) privately, with no
# change to the system, and print the path of its `wstest` wrapper.
#
#   scripts/autobahn/build.sh [--force]
#
# Steps, each skipped when its result is already there:
#   1. a private apt configuration for Debian bullseye (the last Debian with
#      Python 2.7), made from this machine's own apt sources with only the
#      suite renamed (apt_sources.py), with its own lists and cache;
#   2. `apt-get download` of the Python 2.7 packages, unpacked with `dpkg -x`
#      into py27/ (never installed: dpkg's database is not touched);
#   3. pip for that interpreter, bootstrapped from a wheel that the Python 3
#      pip downloads, then requirements-py27.txt and autobahntestsuite into
#      py27env/ (PYTHONUSERBASE);
#   4. bin/wstest: a wrapper that runs the suite in that environment.
#
# The whole build is keyed by a hash of this folder: when nothing here changed
# and bin/wstest exists, the script only prints its path (well under a second).
#
# Environment:
#   WSSERVER_AUTOBAHN_HOME  where it is built (default ~/.cache/wsserver-autobahn)
#   PYTHON                  a Python 3 with pip, to fetch pip's own wheel for 2.7
#                           (default: python3)
# Needs: apt-get, dpkg, a Python 3 with pip, network access to the configured
# Debian archive and to the Python package index; gcc for the optional C
# speed-ups (wsaccel; without gcc the suite runs pure Python, slower).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="${WSSERVER_AUTOBAHN_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/wsserver-autobahn}"
PYTHON3="${PYTHON:-python3}"
# Made absolute (symlinks kept: a venv's python is one) before the cd below.
case "$PYTHON3" in */*) PYTHON3="$(realpath -s "$PYTHON3")" ;; esac
FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,27p' "${BASH_SOURCE[0]}"; exit 0 ;;
    "") ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
esac

SUITE=bullseye
DEBS=(python2.7 python2.7-minimal libpython2.7-minimal libpython2.7-stdlib
      libpython2.7 libpython2.7-dev python2.7-dev libssl1.1 libffi7)
PIP27=(pip==20.3.4 setuptools==44.0.0 wheel==0.37.1)
TESTSUITE=autobahntestsuite==25.10.1
# With a C compiler, autobahn's accelerators (UTF-8 validation, masking).
SPEEDUPS=(wsaccel==0.6.6)

say() { echo "[autobahn $(date +%H:%M:%S)] $*" >&2; }
# apt prints the archive's address on every line; keep it out of logs.
quiet_uris() { sed -E 's#[a-z]+://[^ ]+#<archive>#g' >&2; }

have_cc=0
command -v gcc >/dev/null 2>&1 && have_cc=1
stamp="$(cat "$HERE/build.sh" "$HERE/requirements-py27.txt" "$HERE/apt_sources.py" \
         <(echo "cc=$have_cc") | sha256sum | cut -c1-16)"
if [ "$FORCE" = 0 ] && [ -x "$HOME_DIR/bin/wstest" ] \
        && [ "$(cat "$HOME_DIR/.built" 2>/dev/null)" = "$stamp" ]; then
    echo "$HOME_DIR/bin/wstest"
    exit 0
fi

mkdir -p "$HOME_DIR"
cd "$HOME_DIR"
rm -f .built
started=$(date +%s)

# ---- 1. a private apt configuration ------------------------------------
APT=(apt-get -q
     -o "Dir::Etc::sourcelist=$HOME_DIR/apt/sources.list"
     -o "Dir::Etc::sourceparts=-"
     -o "Dir::State::Lists=$HOME_DIR/apt/lists"
     -o "Dir::Cache=$HOME_DIR/apt/cache"
     -o "Dir::State::status=/dev/null"
     -o "APT::Sandbox::User=$(id -un)")
mkdir -p apt/lists/partial apt/cache/archives/partial debs
"$PYTHON3" "$HERE/apt_sources.py" "$SUITE" > apt/sources.list

missing=()
for p in "${DEBS[@]}"; do
    compgen -G "debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get update ($SUITE, private lists)"
    "${APT[@]}" update 2>&1 | quiet_uris
    say "apt-get download ${missing[*]}"
    (cd debs && "${APT[@]}" download "${missing[@]}") 2>&1 | quiet_uris
fi

# ---- 2. unpack, never install ------------------------------------------
if [ ! -e py27/.unpacked ]; then
    say "unpacking $(ls debs/*.deb | wc -l) packages into py27/"
    rm -rf py27 && mkdir py27
    for deb in debs/*.deb; do dpkg -x "$deb" py27; done
    touch py27/.unpacked
fi

# The environment every Python 2.7 command below runs in. It is written out
# for bin/wstest too; it must never reach a Python 3 (PYTHONHOME would break it).
cat > env.sh <<EOF
export PYTHONHOME="$HOME_DIR/py27/usr"
export PYTHONUSERBASE="$HOME_DIR/py27env"
export LD_LIBRARY_PATH="$HOME_DIR/py27/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export C_INCLUDE_PATH="$HOME_DIR/py27/usr/include/python2.7:$HOME_DIR/py27/usr/include"
export PIP_CACHE_DIR="$HOME_DIR/pipcache"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONWARNINGS=ignore
unset PYTHONPATH PYTHONSTARTUP PYTHONNOUSERSITE PYTHONSAFEPATH VIRTUAL_ENV
EOF
py27() { ( source "$HOME_DIR/env.sh" && exec "$HOME_DIR/py27/usr/bin/python2.7" "$@" ); }

if ! py27 -c 'import ssl, zlib, hashlib, ctypes, json, select' 2>/dev/null; then
    echo "build.sh: the unpacked python2.7 cannot load its standard modules:" >&2
    py27 -c 'import ssl, zlib, hashlib, ctypes, json, select' >&2 || true
    exit 1
fi

# ---- 3. pip, then the suite --------------------------------------------
if ! py27 -m pip --version 2>/dev/null | grep -q '^pip 20\.3\.4 '; then
    say "pip for python2.7"
    mkdir -p wheels
    "$PYTHON3" -m pip download -q --no-deps --only-binary=:all: --python-version 2.7 \
        --implementation cp --abi cp27mu --platform manylinux1_x86_64 -d wheels "${PIP27[@]}"
    py27 wheels/pip-20.3.4-py2.py3-none-any.whl/pip install -q --user --no-index \
        --find-links wheels --no-warn-script-location "${PIP27[@]}"
fi
say "autobahntestsuite and its Python 2.7 dependencies"
extra=()
if [ "$have_cc" = 1 ]; then
    extra=("${SPEEDUPS[@]}")
    # Debian's python2.7 sysconfig names x86_64-linux-gnu-gcc, which plain gcc may lack.
    command -v x86_64-linux-gnu-gcc >/dev/null 2>&1 || export CC=gcc LDSHARED="gcc -pthread -shared"
else
    say "no gcc: the suite runs without wsaccel (slower)"
fi
py27 -m pip install -q --user --no-warn-script-location -r "$HERE/requirements-py27.txt" "${extra[@]}"
py27 -m pip install -q --user --no-warn-script-location --no-deps "$TESTSUITE"
py27 -m pip check >&2

# ---- 4. the wrapper -----------------------------------------------------
mkdir -p bin
cat > bin/wstest <<EOF
#!/usr/bin/env bash
# Autobahn|TestSuite's wstest in its private Python 2.7 (made by $HERE/build.sh).
source "$HOME_DIR/env.sh"
exec "$HOME_DIR/py27/usr/bin/python2.7" "$HOME_DIR/py27env/bin/wstest" "\$@"
EOF
chmod +x bin/wstest
say "$(bin/wstest --autobahnversion 2>&1 | tr '\n' ' ')"
echo "$stamp" > .built
say "built in $(( $(date +%s) - started )) s"
echo "$HOME_DIR/bin/wstest"
