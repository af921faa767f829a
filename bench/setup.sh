#!/usr/bin/env bash
# Bench-only tools in bench/.venv (never in the project venv): the LiteLLM proxy that the chat
# scenarios compare against, and py-spy for profiling. Idempotent; the project venv (.venv) must
# exist already (scripts/install.sh --dev).
set -euo pipefail
cd "$(dirname "$0")"
LITELLM_VERSION="${BENCH_LITELLM_VERSION:-1.106.12}"
# (newer releases need the `litellm-proxy` package, which the package index here lacks)
PY_SPY_VERSION="${BENCH_PY_SPY_VERSION:-0.4.3}"
if [ ! -x ../.venv/bin/hypereal ]; then
  echo "bench/setup.sh: the project venv is missing; run scripts/install.sh --dev first" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.bench-installed-$LITELLM_VERSION-$PY_SPY_VERSION"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet "litellm[proxy]==$LITELLM_VERSION" "py-spy==$PY_SPY_VERSION"
  touch "$stamp"
fi
echo "bench/setup.sh: bench/.venv ready (litellm $LITELLM_VERSION)"
