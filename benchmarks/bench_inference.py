"""Seconds per subject of three-orientation volume inference vs sampling steps and batch size.

    .venv/bin/python benchmarks/bench_inference.py --threads 2 --json benchmarks/results/inference_cpu.json
    .venv/bin/python benchmarks/bench_inference.py --steps 10,20,50 --batch-sizes 8,16,32 --full 20:16
    .venv/bin/python benchmarks/bench_inference.py --device cuda --preset paper-256 --size 256 --amp bf16 \
        --steps 50,100,1000 --batch-sizes 16,32,64 --full 50:32

Subject: the MNI152 2 mm brain (nilearn, offline) as a pseudo-PET (GM + 0.3·WM, smoothed) with its T1, cropped to
the ``--size`` cube like the demo cohort (128³ at 2 mm): ~70–90 brain slices per orientation. Network: the
``--preset`` M2Diff, randomly initialised (timing does not depend on the weights).

Two measurements:
- per-step cost of one sampler step (network forward + diffusion update) for each batch size, median of
  ``--repeats``; from it the seconds per subject for every (steps, batch) pair are *estimated* as
  Σ_orientations ceil(n_slices / batch) · steps · t_step(batch) + fusion time (measured once);
- ``--full STEPS:BATCH[,...]``: the real ``predict_volume`` end to end (all orientations, fusion), *measured*.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m2diff_monai.inference.fusion import fuse_volumes  # noqa: E402
from m2diff_monai.inference.inferer import DiffusionSamplerInferer, resolve_amp  # noqa: E402
from m2diff_monai.inference.volume import brain_slice_indices, predict_volume  # noqa: E402
from m2diff_monai.io.atomic import save_json  # noqa: E402
from m2diff_monai.networks.factory import build_network, count_parameters  # noqa: E402

ORIENTATIONS = ("axial", "coronal", "sagittal")


def mni_subject(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pseudo-PET, T1, brain mask) cubes of ``size``³, normalized to about [0, 1]."""
    from nilearn import datasets
    from scipy import ndimage

    from preprocessing.crop import crop_box, crop_or_pad

    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).dataobj, dtype=np.float32)
    t1 = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=2).dataobj) > 0
    pet = ndimage.gaussian_filter(gm + 0.3 * wm, 1.3)
    box = crop_box(mask, size)
    pet, t1, mask = (crop_or_pad(v, box) for v in (pet, t1, mask))
    return pet / np.percentile(pet[mask], 99.5), np.clip(t1 / np.percentile(t1[mask], 99.5), 0, 1), mask


def step_seconds(net, inferer_kwargs, ld, mri, batch, device, repeats, probe_steps=2) -> float:
    """Median seconds of one sampler step for ``batch`` slices (a ``probe_steps``-step run, divided)."""
    x = torch.from_numpy(np.ascontiguousarray(ld[:, :, ld.shape[2] // 2 - batch // 2 :][:, :, :batch])).permute(2, 0, 1)
    x = x[:, None].contiguous().to(device)
    m = (
        None
        if mri is None
        else torch.from_numpy(np.ascontiguousarray(mri[:, :, mri.shape[2] // 2 - batch // 2 :][:, :, :batch]))
        .permute(2, 0, 1)[:, None]
        .contiguous()
        .to(device)
    )
    inferer = DiffusionSamplerInferer(**inferer_kwargs, steps=probe_steps)
    inferer(x, net, mri=m)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        inferer(x, net, mri=m)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / probe_steps)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="M2Diff preset (demo, paper-128, paper-256)")
    parser.add_argument("--variant", default="V6")
    parser.add_argument("--size", type=int, default=128, help="cube size (demo 128, paper 256)")
    parser.add_argument("--steps", default="10,20,50,100", help="comma list of step counts to estimate")
    parser.add_argument("--batch-sizes", default="8,16,32", help="comma list of batch sizes to measure")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "ancestral"))
    parser.add_argument("--fusion", default="wavelet-stripe")
    parser.add_argument("--no-mri", action="store_true", help="MRI-free inference (M2Diff skips its MRI path)")
    parser.add_argument("--full", default="", help="comma list STEPS:BATCH to run end to end and measure")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=("auto", "bf16", "fp16", "none"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ld, t1, mask = mni_subject(args.size)
    mri = None if args.no_mri else t1
    slices = {o: len(brain_slice_indices(mask, o, args.size)) for o in ORIENTATIONS}
    torch.manual_seed(0)
    net = (
        build_network({"name": "m2diff", "preset": args.preset, "variant": args.variant, "image_size": args.size})
        .to(device)
        .eval()
    )
    inferer_kwargs = {
        "diffusion_config": {"timesteps": 1000},
        "sampler": args.sampler,
        "amp_dtype": resolve_amp(args.amp, device),
        "seed": 0,
    }

    start = time.perf_counter()
    fuse_volumes({o: ld for o in ORIENTATIONS}, method=args.fusion)
    fusion_seconds = time.perf_counter() - start

    steps_list = [int(s) for s in args.steps.split(",") if s]
    batch_list = [int(b) for b in args.batch_sizes.split(",") if b]
    # What a loaded checkpoint samples with (checkpoint.load_model calls for_sampling): no MRI decoder for
    # output_mode "pet". The first batch size is also timed before, decoding every branch, for the ratio.
    decode_all = None
    if hasattr(net, "for_sampling") and mri is not None:
        decode_all = step_seconds(net, inferer_kwargs, ld, mri, batch_list[0], device, args.repeats)
        net.for_sampling()
    per_step = {}
    for batch in batch_list:
        per_step[batch] = step_seconds(net, inferer_kwargs, ld, mri, batch, device, args.repeats)
        print(
            f"batch {batch:4d}: {per_step[batch]:.3f} s per sampler step ({per_step[batch] / batch * 1000:.1f} ms "
            "per slice)",
            flush=True,
        )
    if decode_all is not None:
        print(
            f"batch {batch_list[0]:4d}: {decode_all:.3f} s per sampler step decoding every branch; sampling as a "
            f"loaded checkpoint does: {per_step[batch_list[0]] / decode_all:.2f}x of that",
            flush=True,
        )
    estimates = []
    for steps in steps_list:
        for batch in batch_list:
            calls = sum(math.ceil(n / batch) for n in slices.values())
            seconds = calls * steps * per_step[batch] + fusion_seconds
            estimates.append(
                {"steps": steps, "batch": batch, "seconds_per_subject": round(seconds, 1), "kind": "estimated"}
            )
    measured = []
    for spec in [s for s in args.full.split(",") if s]:
        steps, batch = (int(v) for v in spec.split(":"))
        inferer = DiffusionSamplerInferer(**inferer_kwargs, steps=steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        predict_volume(
            net,
            inferer,
            ld,
            mri,
            brain_mask=mask,
            orientations=ORIENTATIONS,
            fusion=args.fusion,
            batch_size=batch,
            device=device,
            progress=True,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = round(time.perf_counter() - start, 1)
        # CUDA: peak tensor memory of this run; CPU: the process's peak resident set so far.
        peak_mb = (
            torch.cuda.max_memory_allocated(device)
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        ) / 2**20
        measured.append(
            {
                "steps": steps,
                "batch": batch,
                "seconds_per_subject": seconds,
                "kind": "measured",
                "peak_memory_mb": round(peak_mb),
            }
        )

    print(
        f"\n{args.preset} M2Diff {args.variant} ({count_parameters(net) / 1e6:.2f} M params), {args.size}^3 cube, "
        f"{sum(slices.values())} brain slices {slices}, {args.sampler}, "
        f"{'MRI-free' if args.no_mri else 'with MRI'}, device {device}, threads {torch.get_num_threads()}, "
        f"fusion {args.fusion} {fusion_seconds:.1f} s"
    )
    print(f"{'steps':>6} {'batch':>6} {'s/subject':>10}  kind")
    for row in estimates + measured:
        print(f"{row['steps']:>6} {row['batch']:>6} {row['seconds_per_subject']:>10.1f}  {row['kind']}")
    result = {
        "benchmark": "inference",
        "preset": args.preset,
        "variant": args.variant,
        "parameters": count_parameters(net),
        "size": args.size,
        "sampler": args.sampler,
        "mri": not args.no_mri,
        "step_seconds_decoding_every_branch": None if decode_all is None else round(decode_all, 4),
        "device": str(device),
        "amp": args.amp,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "brain_slices": slices,
        "fusion_seconds": round(fusion_seconds, 2),
        "seconds_per_step": {str(b): round(s, 4) for b, s in per_step.items()},
        "rows": estimates + measured,
    }
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
