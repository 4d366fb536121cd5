"""MFdiff training step time and peak memory: the bundle's engine path vs. a plain fp32 eager loop.

Same network (``--preset``/``--variant``, default the demo and paper-192 MFdiff), same synthetic batch, same
diffusion (T=1000, linear, ε-prediction, fixed variance):

- ``plain fp32 eager``: q_sample, forward, ε-MSE (paper Eq. 9), AdamW step — what a from-scratch script does.
- ``engine fp32`` / ``engine amp bf16``: ``SupervisedTrainer`` + ``DiffusionPrepareBatch`` + ``DiffusionLoss`` +
  EMA + gradient clipping, as ``bundles/mfdiff/train.json`` runs it (bf16 autocast on CPU or CUDA).

Each (preset, batch, config) runs in its own subprocess so peak memory is its own (CPU: peak RSS; CUDA:
``max_memory_allocated``). Prints a table; ``--json PATH`` writes the rows.

    .venv/bin/python benchmarks/bench_mfdiff.py [--presets demo,paper-192] [--batches 1,4] [--steps 3]
        [--device cpu|cuda] [--configs ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch
from _timing import peak_memory_mb, step_summary, sync, time_trainer

CONFIGS = {
    "plain fp32 eager": {"mode": "plain", "amp": False},
    "engine fp32": {"mode": "engine", "amp": False},
    "engine amp bf16": {"mode": "engine", "amp": True},
}
SIZES = {"demo": 64, "paper-192": 192}


def run_one(name: str, preset: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    from m2diff_monai.diffusion import build_diffusion
    from m2diff_monai.engines.workflow import seed_everything
    from m2diff_monai.networks.factory import build_network, count_parameters

    cfg = CONFIGS[name]
    torch.set_num_threads(args.threads)
    seed_everything(0)
    device = torch.device(args.device)
    size = args.size or SIZES.get(preset, 128)
    net = build_network({"name": "mfdiff", "preset": preset, "variant": args.variant, "image_size": size}).to(device)
    diffusion = build_diffusion(
        {"timesteps": 1000, "schedule": "linear", "model_mean_type": "eps", "model_var_type": "fixed_large"}
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = {k: torch.rand(batch, 1, size, size, generator=g).to(device) for k in ("ld_pet", "sd_pet", "mri")}
    data["mri_available"] = torch.ones(batch, device=device)
    times: list[float] = []
    total = args.warmup + args.steps

    if cfg["mode"] == "plain":
        ld, sd, mri = data["ld_pet"], data["sd_pet"], data["mri"]
        for step in range(total):
            sync(device)
            start = time.perf_counter()
            optimizer.zero_grad()
            if net.is_diffusion:
                t = torch.randint(0, 1000, (batch,), device=device)
                noise = torch.randn_like(sd)
                out = net(diffusion.q_sample(sd, t, noise), t, ld=ld, mri=mri)["out"]
                loss = torch.nn.functional.mse_loss(out, noise)
            else:
                loss = torch.nn.functional.mse_loss(net(ld=ld, mri=mri)["out"], sd)
            loss.backward()
            optimizer.step()
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    else:
        from monai.engines import SupervisedTrainer

        from m2diff_monai.engines.amp import AutocastInferer
        from m2diff_monai.engines.ema import build_ema
        from m2diff_monai.engines.handlers import EMAUpdateHandler, GradientClipHandler
        from m2diff_monai.engines.losses import DiffusionLoss
        from m2diff_monai.engines.prepare_batch import DiffusionPrepareBatch

        ema = build_ema(net, 0.9999)
        trainer = SupervisedTrainer(
            device=device,
            max_epochs=1,
            train_data_loader=[data] * total,
            network=net,
            optimizer=optimizer,
            loss_function=DiffusionLoss(diffusion),
            prepare_batch=DiffusionPrepareBatch(diffusion, 0.0, net),
            train_handlers=[GradientClipHandler(net, 1.0), EMAUpdateHandler(ema, net)],
            inferer=AutocastInferer("bfloat16" if cfg["amp"] else None),
            decollate=False,
        )
        times = time_trainer(trainer, device, args.warmup)

    peak_mb = peak_memory_mb(device)
    return {"params_m": count_parameters(net) / 1e6, "size": size, **step_summary(times), "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="demo,paper-192")
    parser.add_argument("--variant", default="MFdiff")
    parser.add_argument("--size", type=int, default=None, help="default: the preset's size (64 demo, 192 paper)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--json", default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        name, preset, batch = args.single.split("|")
        print("RESULT " + json.dumps(run_one(name, preset, int(batch), args)))
        return

    names = args.configs.split(",") if args.configs else list(CONFIGS)
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("variant", "steps", "warmup", "threads", "device")]
    if args.size:
        passthrough.append(f"--size={args.size}")
    rows = []
    for preset in args.presets.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for name in names:
                row = {"preset": preset, "batch": batch, "config": name}
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, f"--single={name}|{preset}|{batch}", *passthrough],
                        capture_output=True,
                        text=True,
                        timeout=args.timeout,
                    )
                except subprocess.TimeoutExpired:
                    rows.append({**row, "error": f"timeout {args.timeout:.0f} s"})
                    continue
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    rows.append({**row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]})
                else:
                    rows.append({**row, **json.loads(line[len("RESULT ") :])})
                print(f"done: {rows[-1]}", file=sys.stderr, flush=True)
    print(
        f"MFdiff ({args.variant}) training step, device {args.device}, {args.threads} threads, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(f"{'preset':10s} {'size':>4s} {'batch':>5s} {'config':20s} {'step s':>8s} {'vs plain':>8s} {'peak MB':>8s}")
    for r in rows:
        head = f"{r['preset']:10s} {r.get('size', 0):4d} {r['batch']:5d} {r['config']:20s}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        base = next(
            (
                b["step_s_median"]
                for b in rows
                if b["preset"] == r["preset"]
                and b["batch"] == r["batch"]
                and b["config"] == "plain fp32 eager"
                and "step_s_median" in b
            ),
            None,
        )
        rel = f"{r['step_s_median'] / base:8.2f}" if base else "     n/a"
        print(f"{head} {r['step_s_median']:8.3f} {rel} {r['peak_mb']:8.0f}")
    if args.json:
        from m2diff_monai.io.atomic import save_json

        save_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
