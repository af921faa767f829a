#!/usr/bin/env bash
# The whole bench in one command: set up bench/.venv (LiteLLM, py-spy), then run every
# scenario and write bench/RESULTS.md.
#   bash bench/run.sh            full run (~15 min on 2 cores)
#   bash bench/run.sh --quick    smoke run (~2-3 min)
#   bash bench/run.sh --only 1,2 some scenarios
# Request counts: BENCH_* environment variables (see each bench/*.py docstring).
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
exec .venv/bin/python -m bench.run_all "$@"
