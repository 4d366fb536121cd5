#!/usr/bin/env bash
# MFdiff on the demo cohort: train the demo preset (stage 1, external) → three-orientation inference of the test
# subjects with a truncated start → evaluation report (beside M2Diff's predictions when the main job made them)
# → export as a MONAI bundle whose inference defaults are the demo's sampler.
# About 9 min on 2 AVX-512 CPU cores (26 on AVX2-only ones); reuses the main job's cohort (data_manifests/demo.json) when it exists.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${WORK:-work/demo}"
RUN="${RUN:-runs/mfdiff-demo}"
# STEPS / START_STEP unset: the sampler the training run was evaluated with (stored in the checkpoint by demo.json:
# DDIM 10 steps from t0 = 300, the steps it was trained on, then the LD consistency at FWHM 7 mm)
SAMPLER_FLAGS=(${STEPS:+--steps "$STEPS"} ${START_STEP:+--start-step "$START_STEP"})
EXPORT_FLAGS=(${STEPS:+--set steps="$STEPS"} ${START_STEP:+--set start_step="$START_STEP"})

cohort_size() { python -c "import sys; from m2diff_monai.data.manifest import read_manifest; print(read_manifest(sys.argv[1]).get('size'))" "$1" 2>/dev/null || true; }
if [[ -f data_manifests/demo.json && -d "$WORK/preprocessed" && "$(cohort_size data_manifests/demo.json)" == 64 ]]; then
  echo "== 1/5 demo cohort: reusing data_manifests/demo.json =="
else
  echo "== 1/5 demo cohort (4 mm grid, 64³ cubes) and preprocessing =="
  m2diff-preprocess demo --out "$WORK" --downsample 2 --size 64 --manifest data_manifests/demo.json
fi

echo "== 2/5 training MFdiff (demo preset, stage 1) =="
python -m monai.bundle run training \
  --config_file "['bundles/mfdiff/train.json','bundles/mfdiff/demo.json']" --output_root "$RUN"

echo "== 3/5 three-orientation inference on the test subjects (the sampler stored in the checkpoint) =="
m2diff-infer --bundle bundles/mfdiff --checkpoint "$RUN/external/checkpoints/best.pt" \
  --manifest data_manifests/demo.json --split test --out-dir "$WORK/predictions-mfdiff" \
  "${SAMPLER_FLAGS[@]}"

echo "== 4/5 evaluation =="
methods=(--pred "MFdiff=$WORK/predictions-mfdiff")
if [[ -f "$WORK/predictions/predictions.json" ]]; then
  methods=(--pred "M2Diff=$WORK/predictions" "${methods[@]}")
fi
# --floor-fwhm: demo.json's ld_consistency_fwhm (7 mm), so the Targets show what the LD's noise alone imposes
m2diff-evaluate --manifest data_manifests/demo.json --split test "${methods[@]}" --out "$WORK/report-mfdiff" \
  --baselines gaussian,nlm,bm3d --floor-fwhm 7 --subset "in-distribution=demo-*" --subset "held-out anatomy=heldout-*"

echo "== 5/5 export =="
m2diff-export --bundle bundles/mfdiff --checkpoint "$RUN/external/checkpoints/best.pt" \
  --out "$WORK/exported_bundle_mfdiff" --force "${EXPORT_FLAGS[@]}"

echo "Done. Report: $WORK/report-mfdiff/report.md  Predictions: $WORK/predictions-mfdiff  Bundle: $WORK/exported_bundle_mfdiff"
