"""Sampler overhead per step without a network (the model_fn returns a constant tensor).

    .venv/bin/python benchmarks/bench_samplers.py --batch 16 --size 128 --steps 50 --threads 1 --json out.json
    .venv/bin/python benchmarks/bench_samplers.py --device cuda --batch 64 --size 256

What it measures: the diffusion bookkeeping of one reverse step (buffer gathers, posterior mean, noise draw) for
each sampler and variance type — the part of inference time that is not the network. Median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.diffusion import GaussianDiffusion, build_diffusion, sample  # noqa: E402
from m2diff_monai.io.atomic import save_json  # noqa: E402


def _median_seconds(
    diffusion: GaussianDiffusion, sampler: str, shape: tuple[int, ...], steps: int, repeats: int, device: torch.device
) -> float:
    """Median wall time of one full sampling run (after a warm-up run) with a constant-output model."""
    constant = torch.zeros((shape[0], diffusion.model_output_channels(), *shape[2:]), device=device)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return constant

    def run() -> None:
        sample(diffusion, model_fn, shape, sampler=sampler, steps=steps, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up (buffer cache, respacing cache)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = (args.batch, 1, args.size, args.size)
    results = []
    for var_type, sampler in (("fixed_large", "ancestral"), ("learned_range", "ancestral"), ("fixed_large", "ddim")):
        diffusion = build_diffusion({"model_var_type": var_type})
        seconds = _median_seconds(diffusion, sampler, shape, args.steps, args.repeats, device)
        per_step_ms = seconds / args.steps * 1000
        row = {
            "sampler": sampler,
            "model_var_type": var_type,
            "ms_per_step": round(per_step_ms, 4),
            "us_per_megapixel_step": round(per_step_ms * 1000 / (args.batch * args.size**2 / 1e6), 2),
        }
        results.append(row)
        print(
            f"{sampler:9s} {var_type:13s} {row['ms_per_step']:8.3f} ms/step  "
            f"{row['us_per_megapixel_step']:8.1f} µs/Mpx·step"
        )
    report = {
        "device": str(device),
        "shape": list(shape),
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    if args.json is not None:
        save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
