"""Seconds for all non-learned metrics of one subject (``evaluate_volume``) and, optionally, LPIPS.

    .venv/bin/python benchmarks/bench_metrics.py --size 256 --json metrics.json
    .venv/bin/python benchmarks/bench_metrics.py --size 128 --lpips-random   # LPIPS code path, random backbone

The issue's target: ≤ 10 s for everything but LPIPS on a 256³ subject on 2 CPU cores. The brain is an
ellipsoid of ~1.6 M voxels (about a real brain at 1 mm). Times are medians over ``--repeats``; the breakdown
times each part once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.evaluation import metrics as M  # noqa: E402
from m2diff_monai.io.atomic import save_json  # noqa: E402


def subject(size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = np.indices((size,) * 3, dtype=np.float32) / size - 0.5
    r = np.sqrt((g[0] / 0.27) ** 2 + (g[1] / 0.33) ** 2 + (g[2] / 0.25) ** 2)
    brain = r < 1
    target = gaussian_filter(brain * (0.5 + 0.5 * rng.random(brain.shape, dtype=np.float32)), 2).astype(np.float32)
    pred = (target + 0.03 * rng.standard_normal(target.shape, dtype=np.float32)) * (target > 0)
    return pred.astype(np.float32), target, brain


def timed(fn, repeats: int = 1) -> tuple[float, float, object]:
    """Median wall and CPU seconds (CPU: all threads; shared machines make wall time noisy) and the result."""
    times, cpu, out = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), statistics.median(cpu), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--gaussian", action="store_true", help="SSIM with the 11-tap Gaussian window")
    parser.add_argument("--lpips-random", action="store_true", help="also time LPIPS (random AlexNet backbone)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    pred, target, brain = subject(args.size)
    kw = {"gaussian_weights": args.gaussian}
    dr = M.resolve_data_range(target, brain)
    parts = {
        "psnr+nmse+bias (3D)": lambda: (
            M.psnr(pred, target, brain, dr),
            M.nmse(pred, target, brain),
            M.relative_bias(pred, target, brain),
        ),
        "ssim (3D)": lambda: M.ssim(pred, target, brain, dr, **kw),
        "2D metrics, 3 orientations": lambda: [M.per_slice_metrics(pred, target, brain, dr, a, **kw) for a in range(3)],
        "brain_mask_like_official": lambda: M.brain_mask_like_official(target),
    }
    results: dict[str, dict[str, float]] = {}

    def report(name: str, wall: float, cpu: float, note: str = "") -> None:
        results[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"{args.size}³  {name:<32} {wall:7.2f} s wall {cpu:7.2f} s CPU{note}", flush=True)

    for name, fn in parts.items():
        wall, cpu, _ = timed(fn)
        report(name, wall, cpu)
    regions = {"half": brain & (target > 0.5)}
    wall, cpu, row = timed(lambda: M.evaluate_volume(pred, target, brain, regions, **kw), args.repeats)
    report("evaluate_volume (all but LPIPS)", wall, cpu, "   (target ≤ 10 s at 256³)")
    print(
        f"       psnr {row['psnr']:.2f}  ssim {row['ssim']:.4f}  nmse {row['nmse']:.4f}  ssim_2d {row['ssim_2d']:.4f}"
    )
    if args.lpips_random:
        from m2diff_monai.evaluation.lpips_metric import LPIPSMetric

        metric = LPIPSMetric(_allow_random_backbone=True)
        wall, cpu, _ = timed(lambda: metric(pred, target, brain, dr))
        report("LPIPS axial slices (random net)", wall, cpu)
    if args.json:
        save_json(args.json, {"benchmark": "metrics", "size": args.size, "gaussian": args.gaussian, "seconds": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
