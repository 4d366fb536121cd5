#!/usr/bin/env bash
# Creates .venv (Python 3.10-3.12) and installs m2diff-monai with its test extras.
# Idempotent: skips the install when pyproject.toml has not changed since the last successful one.
# torch build (scripts/torch_build.py decides and says why): a new venv on a machine without an NVIDIA GPU gets
# a CPU build (PyTorch's CPU index when reachable, else a local +cpu wheel pip can find), one with a GPU pip's
# CUDA build; an existing venv keeps its torch. Override with M2DIFF_TORCH=cpu|cuda|keep.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.m2diff-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import m2diff_monai, preprocessing" 2>/dev/null; then
  echo "[setup] installing m2diff-monai and its dependencies into $VENV (a few minutes the first time)"
  torch_spec="$(sed -n 's/^ *"torch\([<>=!~][^"]*\)",.*/\1/p' pyproject.toml | head -n 1)"
  choice="$("$VENV/bin/python" scripts/torch_build.py --spec "$torch_spec")" || exit 1
  eval "$choice"
  echo "[setup] torch: $M2DIFF_TORCH_MODE ($M2DIFF_TORCH_REASON)"
  if [ "${#M2DIFF_TORCH_PIP_ARGS[@]}" -gt 0 ]; then
    "$VENV/bin/python" -m pip install --quiet "${M2DIFF_TORCH_PIP_ARGS[@]}" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -W ignore -c "import torch" \
      || { echo "[setup] installing torch (pip install ${M2DIFF_TORCH_PIP_ARGS[*]}) failed; rerun, or choose another build with M2DIFF_TORCH=cpu|cuda|keep" >&2; exit 1; }
  fi
  "$VENV/bin/python" -m pip install --quiet -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import m2diff_monai, preprocessing, torch, monai, ants" \
    || { echo "[setup] installation failed" >&2; exit 1; }
  "$VENV/bin/python" -c "import torch; print(f'[setup] installed torch {torch.__version__}', f'(CUDA {torch.version.cuda})' if torch.version.cuda else '(CPU build)')"
  echo "$want" > "$stamp"
elif [ -n "${M2DIFF_TORCH:-}" ]; then
  echo "[setup] $VENV is installed already; M2DIFF_TORCH=$M2DIFF_TORCH applies to a new venv (rm -rf $VENV first)"
fi
