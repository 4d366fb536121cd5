#!/usr/bin/env bash
# The main job on the embedded demo cohort (simulated PET on real MNI152 anatomy, built here, no download):
# set up → build and preprocess the cohort (12 subjects + 2 held-out-anatomy test subjects, scanner-like T1s)
# → train a small M2Diff → three-orientation inference on the test subjects, MRI-guided and MRI-free with the
# same checkpoint → evaluation report with figures (M2Diff vs M2Diff-noMRI vs LD) → export a deployable bundle.
# Minutes on 2 CPU cores with the defaults below; the same commands with the paper presets scale to a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${WORK:-work/demo}"
RUN="${RUN:-runs/m2diff-demo}"
# STEPS unset: the sampler the training run was evaluated with (stored in the checkpoint by demo.json)
SAMPLER_FLAGS=(${STEPS:+--steps "$STEPS"})

echo "== 1/5 demo cohort (4 mm grid, 64³ cubes; test split includes the held-out anatomy heldout-*) =="
m2diff-preprocess demo --out "$WORK" --downsample 2 --size 64 --manifest data_manifests/demo.json

echo "== 2/5 training M2Diff (demo preset) =="
python -m monai.bundle run training \
  --config_file "['bundles/m2diff/train.json','bundles/m2diff/demo.json']" --output_dir "$RUN"

echo "== 3/5 three-orientation inference on the test subjects: MRI-guided, then MRI-free (same checkpoint) =="
m2diff-infer --bundle bundles/m2diff --checkpoint "$RUN/checkpoints/best.pt" \
  --manifest data_manifests/demo.json --split test --out-dir "$WORK/predictions" "${SAMPLER_FLAGS[@]}"
m2diff-infer --bundle bundles/m2diff --checkpoint "$RUN/checkpoints/best.pt" \
  --manifest data_manifests/demo.json --split test --out-dir "$WORK/predictions_nomri" "${SAMPLER_FLAGS[@]}" --no-mri

echo "== 4/5 evaluation =="
# --floor-fwhm: demo.json's ld_consistency_fwhm (7 mm), so the Targets show what the LD's noise alone imposes
m2diff-evaluate --manifest data_manifests/demo.json --split test --pred "M2Diff=$WORK/predictions" \
  --pred "M2Diff-noMRI=$WORK/predictions_nomri" --out "$WORK/report" --baselines gaussian,nlm,bm3d \
  --floor-fwhm 7 --subset "in-distribution=demo-*" --subset "held-out anatomy=heldout-*"

echo "== 5/5 export =="
m2diff-export --bundle bundles/m2diff --checkpoint "$RUN/checkpoints/best.pt" --out "$WORK/exported_bundle" \
  --metrics "$WORK/report/summary.csv" --force

echo "Done. Report: $WORK/report/report.md  Predictions: $WORK/predictions  Bundle: $WORK/exported_bundle"
