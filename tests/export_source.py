"""The source of the export tests (``test_export``, ``test_deploy``): a tiny M2Diff V6 checkpoint with a demo
manifest and metrics; the ``source`` and ``exported`` fixtures (``conftest.py``) build on it."""

from __future__ import annotations

from pathlib import Path

import torch

from m2diff_monai.engines.workflow import checkpoint_config
from m2diff_monai.networks.factory import build_network
from tiny_networks import randomize_zero_params, tiny_m2diff

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "m2diff"
TINY_V6 = tiny_m2diff(attention=True)


def write_checkpoint(
    path: Path, net_config: dict, manifest: Path | None = None, ema: bool = True, with_config: bool = True
) -> Path:
    net = randomize_zero_params(build_network(net_config)).eval()
    state = net.state_dict()
    data = {"intensity_range": [0, 1], **({"manifest": str(manifest)} if manifest else {})}
    ckpt = {
        "network": state,
        "ema": {k: v + 0.01 for k, v in state.items()} if ema else None,
        "optimizer": {},
        "scaler": None,
        "epoch": 3,
        "iteration": 30,
    }
    if with_config:
        ckpt["config"] = checkpoint_config(net, {"timesteps": 50}, data)
    torch.save(ckpt, path)
    return path
