#!/usr/bin/env bash
# Creates .venv (Python 3.10-3.12) and installs m2diff-monai with its test extras.
# Idempotent: skips the install when pyproject.toml has not changed since the last successful one.
# GPU users: install a CUDA build of torch first (see README), then run this script; pip keeps that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.m2diff-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import m2diff_monai, preprocessing" 2>/dev/null; then
  echo "[setup] installing m2diff-monai and its dependencies into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install --quiet -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import m2diff_monai, preprocessing, torch, monai, ants, lpips" \
    || { echo "[setup] installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
