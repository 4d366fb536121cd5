"""Training step time and peak memory: the MONAI engine path vs. the official code's plain fp32 eager loop.

Same network (``--preset``/``--variant``), same batch, same synthetic data, same diffusion (T=1000, x0, linear):

- ``plain fp32 eager``: a plain loop: q_sample, forward, 0.4·L_pet + 0.4·L_mri + 0.2·MSE(x̂0_pet, x̂0_mri), Adam
  step (one forward pass; the official loop's L_bias adds a second pass, as the ``engine`` rows do).
- ``plain bf16 autocast``: the same loop under ``torch.autocast(device, bfloat16)`` (works on CPU too).
- ``engine ...``: ``SupervisedTrainer`` + ``DiffusionPrepareBatch`` + ``DiffusionLoss`` + EMA handler, as the
  bundle runs it, with bf16 autocast (the bundle's ``AutocastInferer``: CPU or CUDA) and/or ``channels_last``;
  the official L_bias (``bias_loss="official_xprev"``: a second forward pass on a batch of 2B) unless the name
  ends in ``x0_mse`` (the one-pass x̂0-MSE option): the pair gives the second pass's cost.
- ``--compile`` adds ``engine compile`` (``SupervisedTrainer(compile=True)``), for GPU runs.

Each configuration runs in its own subprocess so peak memory is its own (CPU: peak RSS; CUDA:
``max_memory_allocated``). Prints a table; ``--json PATH`` writes the rows.

    .venv/bin/python benchmarks/bench_training.py [--preset demo] [--size 64] [--batch 4] [--steps 5]
        [--device cpu|cuda] [--compile] [--json out.json]
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
    "plain fp32 eager": {"mode": "plain", "amp": False, "channels_last": False},
    "plain bf16 autocast": {"mode": "plain", "amp": True, "channels_last": False},
    "plain fp32 channels_last": {"mode": "plain", "amp": False, "channels_last": True},
    "engine fp32": {"mode": "engine", "amp": False, "channels_last": False},
    "engine amp bf16": {"mode": "engine", "amp": True, "channels_last": False},
    "engine fp32 x0_mse": {"mode": "engine", "amp": False, "channels_last": False, "bias_loss": "x0_mse"},
    "engine amp bf16 x0_mse": {"mode": "engine", "amp": True, "channels_last": False, "bias_loss": "x0_mse"},
    "engine amp bf16 channels_last": {"mode": "engine", "amp": True, "channels_last": True},
    "engine compile": {"mode": "engine", "amp": True, "channels_last": False, "compile": True},
}


def synthetic_batch(batch: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "ld_pet": torch.rand(batch, 1, size, size, generator=g).to(device),
        "sd_pet": torch.rand(batch, 1, size, size, generator=g).to(device),
        "mri": torch.rand(batch, 1, size, size, generator=g).to(device),
        "mri_available": torch.ones(batch, device=device),
    }


def run_one(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from m2diff_monai.diffusion import build_diffusion
    from m2diff_monai.engines.workflow import prepare_network, seed_everything
    from m2diff_monai.networks.factory import build_network, count_parameters

    torch.set_num_threads(args.threads)
    seed_everything(0)
    device = torch.device(args.device)
    network_config = {"name": "m2diff", "preset": args.preset, "variant": args.variant, "image_size": args.size}
    net = prepare_network(build_network(network_config), device, cfg["channels_last"])
    diffusion = build_diffusion({"timesteps": 1000, "model_mean_type": "x0"})
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    batch = synthetic_batch(args.batch, args.size, device)
    times: list[float] = []

    if cfg["mode"] == "plain":
        mse = torch.nn.functional.mse_loss
        amp_ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg["amp"] else None
        cl = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        ld, sd, mri = (batch[k].contiguous(memory_format=cl) for k in ("ld_pet", "sd_pet", "mri"))
        flag = batch["mri_available"]
        for step in range(args.warmup + args.steps):
            sync(device)
            start = time.perf_counter()
            t = torch.randint(0, 1000, (args.batch,), device=device)
            x_t = diffusion.q_sample(sd, t, torch.randn_like(sd))
            optimizer.zero_grad()
            if amp_ctx is None:
                out = net(x_t, t, ld=ld, mri=mri, mri_available=flag)
            else:
                with amp_ctx():
                    out = net(x_t, t, ld=ld, mri=mri, mri_available=flag)
            pet, mr = out["pet"].float(), out.get("mri", out["pet"]).float()
            loss = 0.4 * mse(pet, sd) + 0.4 * mse(mr, sd) + 0.2 * mse(pet, mr)
            loss.backward()
            optimizer.step()
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
    else:
        from monai.engines import SupervisedTrainer

        from m2diff_monai.engines.amp import AutocastInferer
        from m2diff_monai.engines.ema import build_ema
        from m2diff_monai.engines.handlers import EMAUpdateHandler
        from m2diff_monai.engines.losses import DiffusionLoss
        from m2diff_monai.engines.prepare_batch import DiffusionPrepareBatch

        ema = build_ema(net, 0.9999)
        bias_loss = cfg.get("bias_loss", "official_xprev")
        trainer = SupervisedTrainer(
            device=device,
            max_epochs=1,
            train_data_loader=[batch] * (args.warmup + args.steps),
            network=net,
            optimizer=optimizer,
            loss_function=DiffusionLoss(diffusion, bias_loss=bias_loss),
            prepare_batch=DiffusionPrepareBatch(diffusion, 0.3, net, cfg["channels_last"], bias_loss=bias_loss),
            train_handlers=[EMAUpdateHandler(ema, net)],
            inferer=AutocastInferer("bfloat16" if cfg["amp"] else None),
            decollate=False,
            compile=cfg.get("compile", False),
        )
        times = time_trainer(trainer, device, args.warmup)

    peak_mb = peak_memory_mb(device)
    return {
        "params_m": count_parameters(net) / 1e6,
        **step_summary(times),
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--variant", default="V6")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--configs", default=None, help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--json", default=None)
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        print("RESULT " + json.dumps(run_one(CONFIGS[args.single], args)))
        return

    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if args.compile or "compile" not in n]
    rows = []
    passthrough = [f"--{k}={getattr(args, k)}" for k in ("preset", "variant", "size", "batch", "steps", "warmup",
                                                        "threads", "device")]
    for name in names:
        proc = subprocess.run([sys.executable, __file__, f"--single={name}", *passthrough],
                              capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"config": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]})
            continue
        rows.append({"config": name, **json.loads(line[len("RESULT "):])})
    base = next((r["step_s_median"] for r in rows if r["config"] == "plain fp32 eager" and "step_s_median" in r), None)
    print(f"training step, M2Diff {args.variant} preset {args.preset} at {args.size}², batch {args.batch}, "
          f"device {args.device}, {args.threads} threads, median of {args.steps} steps")
    print(f"{'config':32s} {'step s':>8s} {'vs plain':>8s} {'peak MB':>9s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:32s} failed: {r['error']}")
            continue
        rel = f"{r['step_s_median'] / base:8.2f}" if base else "     n/a"
        print(f"{r['config']:32s} {r['step_s_median']:8.3f} {rel} {r['peak_mb']:9.0f}")
    if args.json:
        from m2diff_monai.io.atomic import save_json

        save_json(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
