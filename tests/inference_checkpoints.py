"""Checkpoints the inference tests share (``test_inference``, ``test_infer_cli``, ``test_infer_shards``): a tiny
M2Diff and the identity stand-in, trained (as far as the format goes) on ``CUBE``³ cubes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import tiny_networks
from m2diff_monai.networks.factory import build_network
from tiny_networks import tiny_m2diff

CUBE = 32
TINY_M2DIFF = tiny_m2diff(CUBE, channel_mult=[1])
DATA_CONFIG = {"size": CUBE, "normalization": "shared", "transform": "rigid", "space": "pet"}


def save_checkpoint(
    path: Path,
    network: nn.Module,
    diffusion: dict | None = None,
    data: dict | None = None,
    ema_state: dict | None = None,
) -> Path:
    """A checkpoint in the ARCHITECTURE format, written as training writes it (``DATA_CONFIG`` unless ``data``)."""
    data = DATA_CONFIG if data is None else data
    return tiny_networks.save_checkpoint(path, network, diffusion or None, data, ema_state=ema_state, iteration=10)


def tiny_m2diff_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network(TINY_M2DIFF)
    return save_checkpoint(path, net, ema_state=net.state_dict())


def identity_checkpoint(path: Path, normalization: str = "shared") -> Path:
    net = build_network({"name": "inference_test_identity"})
    return save_checkpoint(path, net, data={**DATA_CONFIG, "normalization": normalization})
