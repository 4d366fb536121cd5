"""Benchmark the low-dose simulator and the demo cohort build.

Measures: ``simulate`` of one subject (SD + LD + the noise-free calibration reconstruction) at 2 mm and 1 mm on the
MNI152 anatomy; OSEM iterations per second; seconds per demo subject (phantom + simulation + writing); optionally
the whole default demo build (``--demo-build``: raw cohort + preprocessing, minutes).
Targets: one 2 mm subject (SD + LD) ≤ 30 s; default demo build ≤ 10 min on 2 cores.

    .venv/bin/python benchmarks/bench_simulation.py [--resolutions 2,1] [--backends numpy,torch] [--demo-build]
        [--json benchmarks/results/simulation.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocessing.phantom_anatomy import load_anatomy  # noqa: E402
from preprocessing.simulation import ScannerParams, simulate_volume  # noqa: E402
from preprocessing.simulation.forward_model import PlaneStackScanner  # noqa: E402
from preprocessing.simulation.recon import osem  # noqa: E402


def bench_simulate(resolution: int, backend: str) -> dict:
    anatomy = load_anatomy(resolution)
    activity = ((anatomy.gm * 4 + anatomy.wm) * 2500).astype(np.float32)
    mask = (anatomy.gm + anatomy.wm) > 0.5
    params = ScannerParams()
    t0 = time.perf_counter()
    scanner = PlaneStackScanner(
        activity, anatomy.spacing, np.where(anatomy.head > 0, 0.0096, 0).astype(np.float32), params, backend
    )
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    osem(scanner.model, scanner.expected, 1)
    one_iteration = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = simulate_volume(
        activity, anatomy.spacing, 100, seed=0, mode="nested", params=params, calibration_mask=mask, backend=backend
    )
    total = time.perf_counter() - t0
    g = scanner.geometry
    return {
        "resolution_mm": resolution,
        "backend": backend,
        "shape": list(activity.shape),
        "planes": int(scanner.planes.size),
        "angles": g.n_angles,
        "bins": g.n_bins,
        "nnz": int(scanner.operators.forward[0].nnz * params.subsets),
        "setup_s (matrix cached)": round(setup, 2),
        "osem_iterations_per_s": round(1.0 / one_iteration, 3),
        "simulate_sd_ld_s": round(total, 2),
        "ld_vs_sd_psnr_db": round(
            float(10 * np.log10(result.sd[mask].max() ** 2 / np.mean((result.ld[mask] - result.sd[mask]) ** 2))), 2
        ),
    }


def bench_demo_subject(resolution: int) -> dict:
    from preprocessing.demo import DemoOptions, generate_subject

    options = DemoOptions(resolution=resolution)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        record = generate_subject(Path(tmp), "bench-001", "hypometabolism+lesions", "train", options)
        total = time.perf_counter() - t0
    return {
        "resolution_mm": resolution,
        "demo_subject_s": round(total, 2),
        **{f"{k}_s": v for k, v in record["seconds"].items()},
    }


def bench_demo_build(workers: int) -> dict:
    from preprocessing.demo import DemoOptions, build_demo

    with tempfile.TemporaryDirectory() as tmp:
        options = DemoOptions(workers=workers)
        t0 = time.perf_counter()
        from preprocessing.demo import generate_raw_cohort

        generate_raw_cohort(Path(tmp) / "demo" / "raw", options, progress=False)
        raw = time.perf_counter() - t0
        build_demo(Path(tmp) / "demo", Path(tmp) / "demo.json", options, progress=False)
        total = time.perf_counter() - t0
    return {
        "subjects": options.subjects,
        "workers": workers,
        "raw_cohort_s": round(raw, 1),
        "demo_build_total_s": round(total, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolutions", default="2,1")
    p.add_argument("--backends", default="numpy")
    p.add_argument("--demo-build", action="store_true", help="also time the whole default demo build (minutes)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("M2DIFF_CACHE_DIR", tempfile.mkdtemp(prefix="m2diff-bench-cache-"))
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    results = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "node": platform.node()},
        "simulate": [],
        "demo_subject": [],
        "demo_build": None,
    }
    for r in resolutions:
        for b in args.backends.split(","):
            row = bench_simulate(r, b)
            results["simulate"].append(row)
            print(
                f"simulate {r} mm [{b}]: {row['simulate_sd_ld_s']:.1f} s per subject (SD+LD+calibration), "
                f"{row['osem_iterations_per_s']:.2f} OSEM it/s, LD vs SD PSNR {row['ld_vs_sd_psnr_db']} dB"
            )
        row = bench_demo_subject(r)
        results["demo_subject"].append(row)
        print(
            f"demo subject {r} mm: {row['demo_subject_s']:.1f} s (phantom {row['phantom_s']} s, "
            f"simulation {row['simulation_s']} s)"
        )
    if args.demo_build:
        results["demo_build"] = bench_demo_build(args.workers)
        print(
            f"demo build (12 subjects, {args.workers} workers): {results['demo_build']['demo_build_total_s']} s "
            f"(raw cohort {results['demo_build']['raw_cohort_s']} s)"
        )
    print("\n| measure | value |\n|---|---|")
    for row in results["simulate"]:
        print(f"| simulate {row['resolution_mm']} mm [{row['backend']}] s/subject | {row['simulate_sd_ld_s']} |")
        print(f"| OSEM it/s {row['resolution_mm']} mm [{row['backend']}] | {row['osem_iterations_per_s']} |")
    for row in results["demo_subject"]:
        print(f"| demo subject {row['resolution_mm']} mm s | {row['demo_subject_s']} |")
    if results["demo_build"]:
        print(f"| demo build total s | {results['demo_build']['demo_build_total_s']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
