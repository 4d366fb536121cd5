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

``--interleaved`` instead times the plain loop at the official code's 64² layout (``--preset official-64``: 64
channels, mult 1,2,3,4, attention at 16 and 8, scale-shift norm; batch 4) as fp32 and bf16, fp32 channels-last,
eager and (with ``--compile``) ``torch.compile``d, in ONE process, alternating the configurations step by step so
that load from other processes hits all of them alike; it prints each median, the ratios to fp32 eager, the
resolved ``auto`` precision and the 1-minute load average before and after.

    .venv/bin/python benchmarks/bench_training.py [--preset demo] [--size 64] [--batch 4] [--steps 5]
        [--device cpu|cuda] [--compile] [--json out.json]
    .venv/bin/python benchmarks/bench_training.py --interleaved --preset official-64 --threads 2 --steps 5
        [--compile] [--configs fp32,bf16] [--device cuda] [--json out.json]
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


# name → (bf16 autocast, torch.compile, channels_last)
INTERLEAVED = {
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "fp32 channels_last": (False, False, True),
    "fp32 compile": (False, True, False),
    "bf16 compile": (True, True, False),
}


def run_interleaved(args: argparse.Namespace) -> dict[str, Any]:
    """Plain training steps of several configurations alternated in one process (see the module docstring)."""
    import os

    from m2diff_monai.diffusion import build_diffusion
    from m2diff_monai.engines.precision import precision_label, resolve_precision
    from m2diff_monai.engines.workflow import seed_everything
    from m2diff_monai.networks.factory import build_network, count_parameters

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.configs.split(",") if args.configs else [n for n in INTERLEAVED if args.compile or "compile" not in n]
    unknown = [n for n in names if n not in INTERLEAVED]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {', '.join(INTERLEAVED)}")
    diffusion = build_diffusion({"timesteps": 1000, "model_mean_type": "x0"})
    batch = synthetic_batch(args.batch, args.size, device)
    flag = batch["mri_available"]
    layouts = {
        memory: tuple(batch[k].contiguous(memory_format=memory) for k in ("ld_pet", "sd_pet", "mri"))
        for memory in (torch.contiguous_format, torch.channels_last)
    }
    mse = torch.nn.functional.mse_loss
    runs: dict[str, dict[str, Any]] = {}
    for name in names:
        amp, compiled, channels_last = INTERLEAVED[name]
        seed_everything(0)  # every configuration starts from the same weights
        memory = torch.channels_last if channels_last else torch.contiguous_format
        net = build_network(
            {"name": "m2diff", "preset": args.preset, "variant": args.variant, "image_size": args.size}
        ).to(device, memory_format=memory)
        step_net = torch.compile(net) if compiled else net
        runs[name] = {
            "net": step_net,
            "params": count_parameters(net),
            "amp": amp,
            "inputs": layouts[memory],
            "times": [],
            "optimizer": torch.optim.Adam(net.parameters(), lr=1e-4),
        }

    def one_step(run: dict[str, Any]) -> float:
        ld, sd, mri = run["inputs"]
        sync(device)
        start = time.perf_counter()
        t = torch.randint(0, 1000, (args.batch,), device=device)
        x_t = diffusion.q_sample(sd, t, torch.randn_like(sd))
        run["optimizer"].zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run["amp"]):
            out = run["net"](x_t, t, ld=ld, mri=mri, mri_available=flag)
        pet, mr = out["pet"].float(), out.get("mri", out["pet"]).float()
        loss = 0.4 * mse(pet, sd) + 0.4 * mse(mr, sd) + 0.2 * mse(pet, mr)
        loss.backward()
        run["optimizer"].step()
        sync(device)
        return time.perf_counter() - start

    load_before = os.getloadavg()[0]
    compile_s = {}
    for name, run in runs.items():  # warm-up (and compilation) outside the timed rounds
        start = time.perf_counter()
        for _ in range(args.warmup):
            one_step(run)
        compile_s[name] = time.perf_counter() - start
    for _ in range(args.steps):
        for run in runs.values():
            run["times"].append(one_step(run))
    load_after = os.getloadavg()[0]
    rows = [
        {
            "config": name,
            "params_m": run["params"] / 1e6,
            "warmup_s": compile_s[name],
            **step_summary(run["times"]),
            "times": run["times"],
        }
        for name, run in runs.items()
    ]
    base = next((r["step_s_median"] for r in rows if r["config"] == "fp32"), None)
    for r in rows:
        r["vs_fp32_eager"] = r["step_s_median"] / base if base else None
    return {
        "preset": args.preset,
        "variant": args.variant,
        "size": args.size,
        "batch": args.batch,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "auto_precision": precision_label(resolve_precision("auto", device)),
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": load_after,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "rows": rows,
    }


def print_interleaved(result: dict[str, Any]) -> None:
    print(
        f"training step (plain loop), M2Diff {result['variant']} preset {result['preset']} at {result['size']}², "
        f"batch {result['batch']}, {result['device']}, {result['threads']} threads, interleaved, median of "
        f"{result['steps']} steps; load average {result['loadavg_1min_before']:.2f} → "
        f"{result['loadavg_1min_after']:.2f} on {result['cpu_count']} CPUs; 'auto' precision here: "
        f"{result['auto_precision']}"
    )
    print(f"{'config':18s} {'params M':>9s} {'step s':>8s} {'min s':>8s} {'vs fp32':>8s}")
    for r in result["rows"]:
        print(
            f"{r['config']:18s} {r['params_m']:9.2f} {r['step_s_median']:8.3f} {r['step_s_min']:8.3f} "
            f"{r['vs_fp32_eager']:8.2f}"
        )


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
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="alternate fp32/bf16 (eager, and compiled with --compile) step by step in one process",
    )
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.interleaved:
        result = run_interleaved(args)
        print_interleaved(result)
        if args.json:
            from m2diff_monai.io.atomic import save_json

            save_json(args.json, {"args": vars(args), **result})
        return

    if args.single:
        print("RESULT " + json.dumps(run_one(CONFIGS[args.single], args)))
        return

    names = args.configs.split(",") if args.configs else [n for n in CONFIGS if args.compile or "compile" not in n]
    rows = []
    passthrough = [
        f"--{k}={getattr(args, k)}"
        for k in ("preset", "variant", "size", "batch", "steps", "warmup", "threads", "device")
    ]
    for name in names:
        proc = subprocess.run(
            [sys.executable, __file__, f"--single={name}", *passthrough], capture_output=True, text=True
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"config": name, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]})
            continue
        rows.append({"config": name, **json.loads(line[len("RESULT ") :])})
    base = next((r["step_s_median"] for r in rows if r["config"] == "plain fp32 eager" and "step_s_median" in r), None)
    print(
        f"training step, M2Diff {args.variant} preset {args.preset} at {args.size}², batch {args.batch}, "
        f"device {args.device}, {args.threads} threads, median of {args.steps} steps"
    )
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
