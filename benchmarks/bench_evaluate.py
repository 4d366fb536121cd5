"""Seconds for ``m2diff-evaluate`` on one synthetic subject: file reading, every metric but LPIPS, figure panel.

    .venv/bin/python benchmarks/bench_evaluate.py --size 256 --methods 1 --json evaluate.json

The issue's target: ≤ 10 s per 256³ subject (all metrics but LPIPS) on 2 CPU cores. Builds a manifest with one
test subject (gzip NIfTI LD, SD and predictions on a ``size``³ grid, brain ellipsoid of ~1.6 M voxels at 256, a
brain mask and five region masks in the preprocessed folder), then times ``evaluate_cohort`` end to end (wall and
CPU seconds of this process, all threads) and reports the per-subject breakdown the run records (load, metrics,
figure). Scored rows: LD + ``--methods`` predictions (+ ``--baselines``, with their documented defaults: the
bench manifest has no validation subject).

``--baseline-sizes 64,128`` also times each classical baseline of :mod:`m2diff_monai.evaluation.baselines` alone
on a synthetic size³ LD volume (brain ellipsoid filling most of the grid, as the demo's 2 mm brain fills ~91×109×91):
Gaussian (4 mm FWHM), NLM (h = 0.8·σ), BM4D (σ estimated, the lighter profile and, with ``--bm4d-default``, the
package's own profile too), wall and CPU seconds of this process, one thread:

    .venv/bin/python benchmarks/bench_evaluate.py --size 64 --baseline-sizes 64,128 --json baselines.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.data.manifest import provenance, write_manifest  # noqa: E402
from m2diff_monai.evaluation.run import evaluate_cohort  # noqa: E402
from m2diff_monai.io.atomic import save_json  # noqa: E402

REGIONS = ("gm", "wm", "hypometabolism", "lesion_hot", "lesion_cold")


def build(root: Path, size: int, methods: int, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3, dtype=np.float32) / size - 0.5
    r = np.sqrt((g[0] / 0.27) ** 2 + (g[1] / 0.33) ** 2 + (g[2] / 0.25) ** 2)
    del g
    brain = r < 1
    sd = gaussian_filter(brain * (0.5 + 0.5 * rng.random(brain.shape, dtype=np.float32)), 2).astype(np.float32) * 9e3
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -size / 2

    def save(path: Path, data: np.ndarray, dtype=np.float32) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
        return path.relative_to(root).as_posix()

    noise = rng.standard_normal(sd.shape, dtype=np.float32) * 900
    item = {
        "subject": "bench01",
        "split": "test",
        "scale": 1.0,
        "offset": 0.0,
        "mri": "",
        "mri_available": 0,
        "source_mri": "",
        "space": "pet",
        "drf": 100,
        "source_ld_pet": save(root / "raw" / "ld.nii.gz", np.clip(sd + noise, 0, None)),
        "source_sd_pet": save(root / "raw" / "sd.nii.gz", sd),
        "brain_mask": save(root / "prep" / "brain_mask.nii.gz", brain, np.uint8),
        "regions": {
            n: save(root / "prep" / "regions" / f"{n}.nii.gz", brain & (r > 0.2 * i + 0.1), np.uint8)
            for i, n in enumerate(REGIONS)
        },
        "preprocessed_dir": "prep",
    }
    item["ld_pet"] = item["sd_pet"] = item["source_ld_pet"]
    predictions = {}
    for m in range(methods):
        predictions[f"M{m}"] = root / "preds" / f"M{m}"
        save(predictions[f"M{m}"] / "bench01.nii.gz", sd + noise * (0.1 + 0.05 * m))
    manifest = root / "bench.json"
    write_manifest(
        manifest,
        {
            "name": "bench",
            "volumes": [item],
            "training": [],
            "validation": [],
            "test": [],
            "provenance": provenance("benchmarks/bench_evaluate.py", {"size": size}),
        },
    )
    return manifest, predictions


def time_baselines(size: int, names: list[str], bm4d_default: bool = False, seed: int = 0) -> dict[str, dict]:
    """Seconds (wall, CPU) of each baseline on one synthetic size³ LD volume, 2 mm voxels."""
    from m2diff_monai.evaluation import baselines

    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3, dtype=np.float32) / size - 0.5
    brain = np.sqrt((g[0] / 0.36) ** 2 + (g[1] / 0.44) ** 2 + (g[2] / 0.36) ** 2) < 1
    del g
    sd = gaussian_filter(brain * (0.5 + 0.5 * rng.random(brain.shape, dtype=np.float32)), 2).astype(np.float32) * 9e3
    ld = np.clip(sd + rng.standard_normal(sd.shape, dtype=np.float32) * 900, 0, None)
    spacing = (2.0, 2.0, 2.0)
    sigma = baselines.estimate_noise_sigma(ld, brain)
    runs = {
        "gaussian": lambda: baselines.gaussian_baseline(ld, 4.0, spacing),
        "nlm": lambda: baselines.nlm_baseline(ld, brain, 0.8, sigma),
        "bm3d": lambda: baselines.bm4d_baseline(ld, brain, 1.0, sigma),
    }
    if bm4d_default:
        runs["bm3d_default_profile"] = lambda: baselines.bm4d_baseline(
            ld, brain, 1.0, sigma, baselines.BaselineSettings(bm4d_fast_profile=False)
        )
    box = baselines.brain_box(brain, baselines.BaselineSettings().margin_voxels)
    out = {}
    for name, call in runs.items():
        if name.split("_")[0] not in names:
            continue
        t, c = time.perf_counter(), time.process_time()
        call()
        out[name] = {
            "wall_s": round(time.perf_counter() - t, 3),
            "cpu_s": round(time.process_time() - c, 3),
            "box_voxels": int(np.prod([b.stop - b.start for b in box])),
        }
        print(
            f"  {size}³ {name}: {out[name]['wall_s']:.2f} s wall, {out[name]['cpu_s']:.2f} s CPU "
            f"(filtered box {out[name]['box_voxels']} voxels)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--methods", type=int, default=1)
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--baselines", default="", help="also score these baselines end to end (gaussian,nlm,bm3d)")
    parser.add_argument("--baseline-sizes", default="", help="time each baseline alone at these sizes, e.g. 64,128")
    parser.add_argument("--baseline-names", default="gaussian,nlm,bm3d")
    parser.add_argument("--bm4d-default", action="store_true", help="also time BM4D's own (slower) profile")
    args = parser.parse_args(argv)
    baseline_times = {}
    for size in [int(v) for v in args.baseline_sizes.split(",") if v.strip()]:
        baseline_times[str(size)] = time_baselines(size, args.baseline_names.split(","), args.bm4d_default)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        manifest, predictions = build(Path(tmp), args.size, args.methods)
        print(f"built {args.size}³ subject in {time.perf_counter() - t:.1f} s", flush=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        summary = evaluate_cohort(
            manifest,
            predictions,
            Path(tmp) / "report",
            lpips=False,
            figures=not args.no_figures,
            progress=False,
            baselines=args.baselines or None,
        )
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    parts = summary["seconds"]["subjects"]["bench01"]
    result = {
        "size": args.size,
        "methods_scored": args.methods + 1,
        "figures": not args.no_figures,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "subject_parts_wall_s": parts,
        "baselines": summary["baselines"]["rows"],
        "baseline_seconds": baseline_times,
    }
    print(
        f"{args.size}³, LD + {args.methods} method(s): {wall:.2f} s wall, {cpu:.2f} s CPU "
        f"(load {parts['load']:.2f} s, baselines {parts['baselines']:.2f} s, metrics {parts['metrics']:.2f} s, "
        f"figure {parts['figure']:.2f} s wall; per-subject CPU: load {parts['cpu_load']:.2f} s, baselines "
        f"{parts['cpu_baselines']:.2f} s, metrics {parts['cpu_metrics']:.2f} s, "
        f"figure {parts['cpu_figure']:.2f} s)"
    )
    if args.json:
        save_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
