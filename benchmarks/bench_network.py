"""Forward and forward+backward time and memory of the M2Diff networks (fp32 vs bf16 autocast, channels_last).

    .venv/bin/python benchmarks/bench_network.py --preset demo --variants V1,V6 --batch 8 --json out.json
    .venv/bin/python benchmarks/bench_network.py --preset paper-256 --device cuda --batch 4

Memory: ``act_MB`` is the size of the tensors autograd saves for backward during one training forward (counted
by storage, parameters excluded) — device independent and deterministic; on CUDA ``peak_MB`` adds the allocator's
peak over one training step. Times are medians over ``--repeats`` after ``--warmup`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.io.atomic import save_json  # noqa: E402
from m2diff_monai.networks import build_network, count_parameters  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _saved_activation_bytes(net, call) -> int:
    """Bytes of distinct storages autograd saves for backward in one forward (parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call()
    del out
    return sum(storages.values())


def bench_one(args: argparse.Namespace, variant: str, precision: str, memory_format: str) -> dict:
    device = torch.device(args.device)
    config = {
        "name": "m2diff",
        "preset": args.preset,
        "variant": variant,
        "learn_sigma": args.learn_sigma,
        "use_checkpoint": args.checkpointing,
    }
    if args.image_size:
        config["image_size"] = args.image_size
    torch.manual_seed(0)
    net = build_network(config).to(device)
    size = net.config["image_size"]
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    shape = (args.batch, 1, size, size)
    x, ld, mri = (torch.randn(shape, device=device).contiguous(memory_format=fmt) for _ in range(3))
    t = torch.randint(0, 1000, (args.batch,), device=device)
    flags = (torch.rand(args.batch, device=device) < 0.7).float()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def forward():
        with autocast:
            return net(x, t, ld, mri, flags)

    def infer():
        with torch.no_grad():
            forward()

    def train_step():
        net.zero_grad(set_to_none=True)
        out = forward()
        loss = sum(v.float().square().mean() for k, v in out.items() if k != "out")
        loss.backward()

    net.eval()
    fwd = _timed(infer, device, args.warmup, args.repeats)
    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = _timed(train_step, device, args.warmup, args.repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    act = _saved_activation_bytes(net, forward) / 2**20
    return {
        "variant": variant,
        "preset": args.preset,
        "image_size": size,
        "batch": args.batch,
        "device": str(device),
        "precision": precision,
        "memory_format": memory_format,
        "params_M": round(count_parameters(net) / 1e6, 3),
        "forward_s": round(fwd, 4),
        "train_step_s": round(step, 4),
        "act_MB": round(act, 1),
        "peak_MB": None if peak is None else round(peak, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--variants", default="V1,V6")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=0, help="override the preset's image size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--memory-formats", default="contiguous,channels_last")
    parser.add_argument("--learn-sigma", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2

    rows = []
    header = (
        f"{'variant':<7} {'params_M':>9} {'precision':<9} {'format':<13} {'fwd_s':>8} {'step_s':>8} "
        f"{'act_MB':>8} {'peak_MB':>8}"
    )
    print(f"preset={args.preset} batch={args.batch} device={args.device} threads={torch.get_num_threads()}")
    print(header)
    for variant in args.variants.split(","):
        for precision in args.precisions.split(","):
            for memory_format in args.memory_formats.split(","):
                row = bench_one(args, variant.strip(), precision.strip(), memory_format.strip())
                rows.append(row)
                peak = "-" if row["peak_MB"] is None else f"{row['peak_MB']:.0f}"
                print(
                    f"{row['variant']:<7} {row['params_M']:>9.3f} {precision:<9} {memory_format:<13} "
                    f"{row['forward_s']:>8.3f} {row['train_step_s']:>8.3f} {row['act_MB']:>8.0f} {peak:>8}",
                    flush=True,
                )
    if args.json:
        save_json(args.json, {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
