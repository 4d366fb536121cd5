#!/usr/bin/env bash
# Every GPU measurement the docs promise, in one go on one GPU machine (budget: under 8 minutes on one H100/H200):
#   1. training: one M2Diff step at the official 64² layout, fp32 vs bf16, eager vs torch.compile, interleaved
#      (benchmarks/bench_training.py --interleaved) → results/gpu_training.json
#   2. inference: a paper-256 subject (256³ cube), seconds and peak memory, bf16, 10/50/1000 steps estimated and
#      50 steps measured end to end (benchmarks/bench_inference.py) → results/gpu_inference_paper256.json
#   3. sampler parity: 10- and 50-step DDIM vs the papers' 1000-step ancestral chain on the first test subject of
#      a trained checkpoint (PSNR / NMSE of each against the 1000-step volume) → results/gpu_parity.json.
#      Needs CHECKPOINT and MANIFEST (default: the main job's runs/m2diff-demo/checkpoints/best.pt and
#      data_manifests/demo.json); skipped with a note when they do not exist.
#
#   bash benchmarks/gpu_suite.sh                 # on the GPU machine
#   bash benchmarks/gpu_suite.sh --dry-run       # print the commands only
#   DEVICE=cpu bash benchmarks/gpu_suite.sh      # tiny sizes on CPU: checks the plumbing, not a measurement
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
DEVICE="${DEVICE:-cuda}"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}"
RESULTS="${RESULTS:-benchmarks/results}"
CHECKPOINT="${CHECKPOINT:-runs/m2diff-demo/checkpoints/best.pt}"
MANIFEST="${MANIFEST:-data_manifests/demo.json}"
SCRATCH="${SCRATCH:-}"

if [[ "$DEVICE" == cuda ]]; then
  TRAIN_ARGS=(--preset official-64 --batch 4 --steps 20 --warmup 3 --compile --threads 8)
  INFER_ARGS=(--preset paper-256 --size 256 --amp bf16 --steps 10,50,1000 --batch-sizes 32,64 --full 50:64)
  PARITY_ARGS=(--device cuda --amp bf16 --batch-size 64)
else  # tiny CPU mode: the same commands at demo sizes
  TRAIN_ARGS=(--preset demo --batch 2 --steps 1 --warmup 1 --threads 1 --configs fp32)
  INFER_ARGS=(--preset demo --size 128 --amp none --steps 2 --batch-sizes 8 --repeats 1 --threads 1)
  PARITY_ARGS=(--device cpu --amp none --batch-size 16 --threads 1)
fi

run() {
  echo "+ $*"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

if [[ "$DRY_RUN" == 0 ]]; then
  mkdir -p "$RESULTS"
  [[ -n "$SCRATCH" ]] || SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")"
else
  SCRATCH="${SCRATCH:-SCRATCH}"
fi
start=$(date +%s)
echo "== 1/3 training step: fp32/bf16, eager/compiled, interleaved ($DEVICE) =="
run "$PYTHON" benchmarks/bench_training.py --interleaved --device "$DEVICE" "${TRAIN_ARGS[@]}" \
  --json "$RESULTS/gpu_training.json"

echo "== 2/3 paper-256 subject: time and peak memory ($DEVICE) =="
run "$PYTHON" benchmarks/bench_inference.py --device "$DEVICE" "${INFER_ARGS[@]}" \
  --json "$RESULTS/gpu_inference_paper256.json"

echo "== 3/3 10/50-step DDIM vs 1000-step ancestral ($DEVICE) =="
if [[ "$DRY_RUN" == 0 && ! ( -f "$CHECKPOINT" && -f "$MANIFEST" ) ]]; then
  echo "skipped: no trained checkpoint ($CHECKPOINT) or manifest ($MANIFEST); set CHECKPOINT= and MANIFEST="
  "$PYTHON" -c "import json,sys; json.dump({'skipped': 'no checkpoint or manifest', 'checkpoint': sys.argv[1], \
'manifest': sys.argv[2]}, open(sys.argv[3], 'w'), indent=2)" "$CHECKPOINT" "$MANIFEST" "$RESULTS/gpu_parity.json"
else
  SUBJECT="$([[ "$DRY_RUN" == 0 ]] && "$PYTHON" -c "import json,sys; m=json.load(open(sys.argv[1])); \
print(next(v['subject'] for v in m['volumes'] if v['split'] == 'test'))" "$MANIFEST" || echo FIRST_TEST_SUBJECT)"
  for chain in "ancestral all" "ddim 50" "ddim 10"; do
    read -r sampler steps <<<"$chain"
    run "$PYTHON" -m m2diff_monai.inference.cli --bundle bundles/m2diff --checkpoint "$CHECKPOINT" \
      --manifest "$MANIFEST" --split test --subjects "$SUBJECT" --out-dir "$SCRATCH/$sampler-$steps" \
      --sampler "$sampler" --steps "$steps" --no-png --no-progress "${PARITY_ARGS[@]}"
  done
  run "$PYTHON" - "$SCRATCH" "$SUBJECT" "$RESULTS/gpu_parity.json" <<'PY'
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

scratch, subject, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ref = np.asarray(nib.load(scratch / "ancestral-all" / f"{subject}.nii.gz").dataobj, dtype=np.float64)
rows = {}
for name in ("ddim-50", "ddim-10"):
    pred = np.asarray(nib.load(scratch / name / f"{subject}.nii.gz").dataobj, dtype=np.float64)
    mse = float(np.mean((pred - ref) ** 2))
    rows[name] = {"psnr_vs_1000_db": 10 * np.log10(float(ref.max()) ** 2 / mse) if mse > 0 else float("inf"),
                  "nmse_vs_1000": float(np.sum((pred - ref) ** 2) / np.sum(ref ** 2))}
json.dump({"subject": subject, "reference": "ancestral, 1000 steps", "rows": rows}, open(out, "w"), indent=2)
print(json.dumps(rows, indent=2))
PY
fi
echo "gpu_suite: $(( $(date +%s) - start )) s; results in $RESULTS/"
