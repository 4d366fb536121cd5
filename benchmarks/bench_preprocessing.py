"""Seconds per subject by stage, and peak memory, of ``m2diff-preprocess run`` on MNI-derived subjects.

    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=2 .venv/bin/python benchmarks/bench_preprocessing.py \
        --resolutions 2 --workers 1 2 --subjects 2 --json benchmarks/results/preprocessing.json
    .venv/bin/python benchmarks/bench_preprocessing.py --resolutions 1 --workers 1 --subjects 1   # ~4-5 min

Each subject: FDG-like SD PET from the nilearn MNI152 grey/white-matter maps (GM:WM uptake 1:0.3, 6 mm FWHM), a
noisy LD PET, and the MNI T1 rigidly misaligned (rotation + shift, different per subject). Cube 128 at 2 mm, 256
at 1 mm. Every configuration runs in its own child process so that peak memory is clean: ``peak_MB_main`` is the
child's max RSS, ``peak_MB_worker`` the largest worker's (``--workers > 1``). RSS, not tracemalloc: ANTs allocates
in C++. Issue targets: <= 30 s/subject at 2 mm with SyN, <= 5 min at 1 mm on 2 cores, <= 3 GB per worker.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ("registration", "mask", "normalization", "crop", "write_volumes", "slices", "qc")


def make_subjects(root: Path, n: int, resolution: int) -> Path:
    import nibabel as nib
    import numpy as np
    from nilearn import datasets
    from scipy import ndimage
    from scipy.spatial.transform import Rotation

    gm = datasets.load_mni152_gm_template(resolution=resolution)
    wm = datasets.load_mni152_wm_template(resolution=resolution)
    t1 = datasets.load_mni152_template(resolution=resolution)
    spacing = float(abs(gm.affine[0, 0]))
    sd = ndimage.gaussian_filter(1.0 * gm.get_fdata() + 0.3 * wm.get_fdata(), 6.0 / 2.3548 / spacing) * 1000.0
    sd = sd.astype(np.float32)
    rng = np.random.default_rng(0)
    lines = ["subject_id,ld_pet,sd_pet,mri"]
    for i in range(n):
        sid = f"mni{resolution}mm-{i:02d}"
        ld = np.clip(sd + 0.15 * sd.max() * rng.standard_normal(sd.shape) * (sd > 0.02 * sd.max()), 0, None)
        nib.save(nib.Nifti1Image(sd, gm.affine), root / f"{sid}_sd.nii.gz")
        nib.save(nib.Nifti1Image(ld.astype(np.float32), gm.affine), root / f"{sid}_ld.nii.gz")
        move = np.eye(4)
        move[:3, :3] = Rotation.from_euler("xz", [3.0 + i, 6.0 + 2 * i], degrees=True).as_matrix()
        move[:3, 3] = (5.0 + i, -3.0, 2.0)
        nib.save(nib.Nifti1Image(t1.get_fdata().astype(np.float32), move @ t1.affine), root / f"{sid}_t1.nii.gz")
        lines.append(f"{sid},{sid}_ld.nii.gz,{sid}_sd.nii.gz,{sid}_t1.nii.gz")
    (root / "subjects.csv").write_text("\n".join(lines) + "\n")
    return root / "subjects.csv"


def run_one(resolution: int, workers: int, n: int, transform: str) -> dict:
    """One configuration, in this (child) process."""
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    with tempfile.TemporaryDirectory(prefix="bench-pre-") as tmp:
        tmp = Path(tmp)
        table = make_subjects(tmp, n, resolution)
        size = 128 if resolution >= 2 else 256
        options = PipelineOptions(transform=transform, size=size, workers=workers)
        start = time.perf_counter()
        summary = run_pipeline(table, tmp / "out", tmp / "m.json", options)
        wall = time.perf_counter() - start
        records = [json.loads((tmp / "out/subjects" / sid / "subject.json").read_text()) for sid in summary.processed]
    per_stage = {s: sum(r["timings"][s] for r in records) / len(records) for s in STAGES}
    return {
        "resolution_mm": resolution,
        "workers": workers,
        "subjects": n,
        "transform": transform,
        "size": size,
        "itk_threads": os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", ""),
        "wall_s": round(wall, 2),
        "wall_s_per_subject": round(wall / n, 2),
        "subject_s_mean": round(sum(per_stage.values()), 2),
        "stage_s_mean": {k: round(v, 3) for k, v in per_stage.items()},
        "peak_MB_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_MB_worker": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
        if workers > 1
        else None,
        "mattes_mi_before_after": [
            [round(r["registration"]["similarity"]["mattes_mi"][k], 3) for k in ("before", "after")] for r in records
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2], choices=[1, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--subjects", type=int, default=2)
    parser.add_argument("--transform", default="SyN")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--_child", nargs=2, type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(run_one(args._child[0], args._child[1], args.subjects, args.transform)))
        return 0
    env = {**os.environ}
    env.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")
    results = []
    for res in args.resolutions:
        for workers in args.workers:
            cmd = [sys.executable, __file__, "--_child", str(res), str(workers), "--subjects", str(args.subjects),
                   "--transform", args.transform]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[-1]
            print(f"done {res} mm, workers {workers}: {r['wall_s_per_subject']} s/subject", file=sys.stderr)
    header = ["mm", "workers", "n", "s/subject (wall)", "subject s", *STAGES, "peak MB main", "peak MB worker"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r["resolution_mm"], r["workers"], r["subjects"], r["wall_s_per_subject"], r["subject_s_mean"],
                 *(r["stage_s_mean"][s] for s in STAGES), r["peak_MB_main"], r["peak_MB_worker"] or ""]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        from m2diff_monai.io.atomic import save_json

        save_json(args.json, {"benchmark": "preprocessing", "cpu_count": os.cpu_count(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
