"""Seconds to fuse three orientation volumes, per method and size, and what the stripe filter does to a volume.

    .venv/bin/python benchmarks/bench_fusion.py --sizes 128,256 --json fusion.json
    .venv/bin/python benchmarks/bench_fusion.py --sizes 128 --workers 2 --quality

Inputs are a PET-like phantom (a blurred ellipsoid shell, zero background) with independent per-slice offsets
along each orientation's stacking axis (what 2D predictions restacked into a volume look like). Times are the
median over ``--repeats``. ``--quality`` adds, for the stripe filter (capped vs LowGAN's uncapped 8 levels):
the relative change of a clean volume, the stripe energy left, and the brain-mean bias.
CPU seconds (all threads) are printed beside wall time because shared machines make wall time noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.data.orientation import ORIENTATION_AXIS  # noqa: E402
from m2diff_monai.inference.fusion import FUSION_METHODS, filter_orientation_volume, fuse_volumes  # noqa: E402
from m2diff_monai.io.atomic import save_json  # noqa: E402


def phantom(size: int) -> np.ndarray:
    g = np.indices((size,) * 3, dtype=np.float32) / size - 0.5
    r = np.sqrt((g[0] / 0.33) ** 2 + (g[1] / 0.4) ** 2 + (g[2] / 0.3) ** 2)
    shell = (r < 1).astype(np.float32) * (0.4 + 0.6 * (r > 0.75)) * (1 + 0.2 * np.sin(12 * g[0]))
    return gaussian_filter(shell, size / 128).astype(np.float32)


def striped(clean: np.ndarray, axis: int, seed: int) -> np.ndarray:
    shape = [1, 1, 1]
    shape[axis] = clean.shape[axis]
    offsets = 0.03 * np.random.default_rng(seed).standard_normal(clean.shape[axis]).astype(np.float32)
    return clean + offsets.reshape(shape) * (clean > 0.05)


def stripe_energy(volume: np.ndarray, clean: np.ndarray, axis: int, brain: np.ndarray) -> float:
    other = tuple(i for i in range(3) if i != axis)
    d = ((volume - clean) * brain).sum(axis=other) / np.maximum(brain.sum(axis=other), 1)
    return float(np.var(d - gaussian_filter1d(d, 3)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--methods", default=",".join(FUSION_METHODS))
    parser.add_argument("--workers", type=int, default=1, help="threads for the stripe filter")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quality", action="store_true", help="also measure the stripe filter's effect")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        clean = phantom(size)
        vols = {name: striped(clean, axis, seed) for seed, (name, axis) in enumerate(ORIENTATION_AXIS.items())}
        brain = clean > 0.05
        for method in args.methods.split(","):
            times, cpu, fused = [], [], None
            for _ in range(args.repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                fused = fuse_volumes(vols, method=method, workers=args.workers)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
            err = float(np.linalg.norm((fused - clean)[brain]) / np.linalg.norm(clean[brain]))
            rows.append(
                {
                    "size": size,
                    "method": method,
                    "seconds": statistics.median(times),
                    "cpu_seconds": statistics.median(cpu),
                    "rel_error": err,
                }
            )
            print(
                f"{size:>4}³  {method:<15} {rows[-1]['seconds']:8.2f} s wall {rows[-1]['cpu_seconds']:8.2f} s CPU"
                f"   rel. error vs truth {err:.4f}",
                flush=True,
            )
        if args.quality:
            axis = ORIENTATION_AXIS["axial"]
            before = stripe_energy(vols["axial"], clean, axis, brain)
            for cap in (True, False):
                out = filter_orientation_volume(vols["axial"], axis, cap_levels=cap, workers=args.workers)
                out[vols["axial"] <= 0] = 0
                kept = filter_orientation_volume(clean, axis, cap_levels=cap, workers=args.workers)
                kept[clean <= 0] = 0
                row = {
                    "size": size,
                    "method": f"stripe-filter cap_levels={cap}",
                    "clean_rel_change": float(np.linalg.norm((kept - clean)[brain]) / np.linalg.norm(clean[brain])),
                    "stripe_energy_left": stripe_energy(out, clean, axis, brain) / before,
                    "clean_mean_bias": float(kept[brain].mean() / clean[brain].mean() - 1),
                }
                rows.append(row)
                print(
                    f"{size:>4}³  stripe filter cap_levels={cap!s:<5}: clean volume changed "
                    f"{row['clean_rel_change']:.4f}, stripe energy left {row['stripe_energy_left']:.3f}, "
                    f"brain-mean bias {row['clean_mean_bias']:+.4f}",
                    flush=True,
                )
    if args.json:
        save_json(args.json, {"benchmark": "fusion", "workers": args.workers, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
