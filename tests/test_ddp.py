"""Multi-GPU overlay smoke test on CPU: torchrun, 2 processes, gloo, DistributedSampler, rank-0-only handlers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_networks import tiny_m2diff

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "m2diff"


@pytest.mark.slow
def test_torchrun_two_process_gloo_training(tmp_path, slice_manifest):
    out = tmp_path / "run"
    overlay = {
        "bundle_root": str(BUNDLE),
        "manifest_file": str(slice_manifest),
        "output_dir": str(out),
        "backend": "gloo",
        "device": "$torch.device('cpu')",
        "network_config": tiny_m2diff(),
        "diffusion_config#timesteps": 50,
        "max_epochs": 1,
        "batch_size": 2,
        "num_workers": 0,
        "cache": "memory",
        "val_num_slices": 2,
        "val_batch_size": 2,
        "val_steps": 2,
        "amp_dtype": None,
    }
    overlay_file = tmp_path / "tiny_overlay.json"
    overlay_file.write_text(json.dumps(overlay))
    configs = [str(BUNDLE / "train.json"), str(BUNDLE / "multi_gpu_train.json"), str(overlay_file)]
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        json.dumps(configs),
        "--meta_file",
        str(BUNDLE / "metadata.json"),
        "--logging_file",
        str(BUNDLE / "logging.conf"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # One retry: torchrun's standalone rendezvous picks free ports at start-up, and on a 2-core machine running the
    # suite in parallel a start-up race failed this test once in ~10 full runs; a real training failure fails twice.
    first = None
    for _attempt in range(2):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
        if result.returncode == 0:
            break
        first = first or result.stdout[-2000:] + result.stderr[-2000:]
    assert result.returncode == 0, (
        f"first attempt:\n{first}\nsecond attempt:\n" + result.stdout[-3000:] + result.stderr[-3000:]
    )
    if first is not None:
        print(f"torchrun failed once, passed on retry; first attempt:\n{first}")
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    # 12 training slices split over 2 ranks (DistributedSampler): 6 per rank, batch 2 → 3 iterations per epoch
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3
    assert not any(k.startswith("module.") for k in ckpt["network"])  # saved unwrapped, loadable as is
    assert (out / "checkpoints" / "best.pt").is_file()
    # validation ran on both ranks (ignite metrics all-reduce), its logging only on rank 0
    log = result.stdout + result.stderr
    assert log.count("Key metric: val_psnr best value") == 1
