#!/usr/bin/env bash
# Choose a checkpoint's LD-consistency FWHM on the validation split (never on test):
# inference on the validation subjects with each candidate FWHM (and with the consistency off), one evaluation
# with the classical baselines, then the smallest FWHM whose PSNR is at least MARGIN dB above the best baseline
# (m2diff_monai/inference/consistency_tuning.py says why). The evaluation also scores each FWHM's floor, the
# consistency applied to the SD (what a perfect network would read: m2diff_monai/inference/consistency_floor.py). The demo recipes' ld_consistency_fwhm was chosen with
# it; run it for your own checkpoint and pass the result to m2diff-infer --ld-consistency-fwhm or store it with
# m2diff-export --set ld_consistency_fwhm=<mm>.
#
#   scripts/tune_consistency.sh BUNDLE CHECKPOINT [MANIFEST] [OUT]
#   e.g. scripts/tune_consistency.sh bundles/m2diff runs/m2diff-demo/checkpoints/best.pt
# Environment: FWHMS (default "4 5 6 7 8 9 10 off"), MARGIN (default 1.0), SPLIT (default val).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
BUNDLE=$1
CHECKPOINT=$2
MANIFEST=${3:-data_manifests/demo.json}
OUT=${4:-work/consistency-tuning/$(basename "$BUNDLE")}
FWHMS=${FWHMS:-4 5 6 7 8 9 10 off}
MARGIN=${MARGIN:-1.0}
SPLIT=${SPLIT:-val}
if [[ "$SPLIT" == "test" ]]; then
  echo "tune_consistency.sh: choosing on the test split would make its scores optimistic; use val" >&2
  exit 2
fi
methods=()
for fwhm in $FWHMS; do
  echo "== inference, LD-consistency FWHM $fwhm =="
  setting=$fwhm
  [[ "$fwhm" == "off" ]] && setting=none
  m2diff-infer --bundle "$BUNDLE" --checkpoint "$CHECKPOINT" --manifest "$MANIFEST" --split "$SPLIT" \
    --out-dir "$OUT/fwhm-$fwhm" --ld-consistency-fwhm "$setting" --no-png
  methods+=(--pred "fwhm-$fwhm=$OUT/fwhm-$fwhm")
done
finite=()
for fwhm in $FWHMS; do [[ "$fwhm" != "off" ]] && finite+=("$fwhm"); done
if [[ ${#finite[@]} -gt 0 ]]; then
  echo "== floors: the consistency applied to the SD, FWHM ${finite[*]} =="
  python -m m2diff_monai.inference.consistency_floor --manifest "$MANIFEST" --split "$SPLIT" --fwhm "${finite[@]}" \
    --out-dir "$OUT"
  for fwhm in "${finite[@]}"; do methods+=(--pred "floor-$fwhm=$OUT/floor-$fwhm"); done
fi
echo "== evaluation of the $SPLIT split with the classical baselines =="
m2diff-evaluate --manifest "$MANIFEST" --split "$SPLIT" "${methods[@]}" --baselines gaussian,nlm,bm3d \
  --out "$OUT/report" --no-figures --no-lpips
python -m m2diff_monai.inference.consistency_tuning "$OUT/report" --margin "$MARGIN"
