#!/usr/bin/env bash
# The main job on the embedded demo cohort: set up, build the demo cohort, preprocess it, and (as the later
# stages land) train a small M2Diff, infer in three orientations, evaluate and export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${WORK:-work/demo}"
m2diff-preprocess demo --out "$WORK" --manifest data_manifests/demo.json
