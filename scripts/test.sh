#!/usr/bin/env bash
# Sets up the environment, checks lint and formatting (ruff, configured in pyproject.toml), and runs the whole
# test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
style=ok
.venv/bin/python -m ruff check --output-format concise . || style=failed
.venv/bin/python -m ruff format --check --output-format concise . || style=failed
if [ "$style" != ok ]; then
  echo "ruff findings above; fix with: .venv/bin/ruff check --fix . && .venv/bin/ruff format .  (docs/DEVELOPING.md)" >&2
  exit 1
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS="${ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS:-1}"
exec .venv/bin/python -m pytest -n 2 --durations=20 "$@"
