"""Exponential moving average of the network weights, on ``torch.optim.swa_utils.AveragedModel``.

IDDPM's trainer keeps an EMA with decay 0.9999 and samples with it; the official M2Diff code keeps none
(``decay=None`` here reproduces that: validation and checkpoints then use the raw weights).
``warmup=True`` uses decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so short runs (the demo) are not
dominated by the random initial weights; IDDPM has no warm-up (the default).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            network = network.module
        else:
            return network


def ema_decay(decay: float, num_averaged: int, warmup: bool) -> float:
    """The decay used for the update after ``num_averaged`` previous updates."""
    if not warmup:
        return decay
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def _ema_update_fn(decay: float, warmup: bool):
    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], model_params: list[torch.Tensor], num_averaged: Any) -> None:
        d = ema_decay(decay, int(num_averaged), warmup) if warmup else decay
        # ema ← d·ema + (1 − d)·p  ==  lerp(ema, p, 1 − d)
        torch._foreach_lerp_(ema_params, model_params, 1.0 - d)

    return update


def build_ema(network: torch.nn.Module, decay: float | None = 0.9999, warmup: bool = False) -> AveragedModel | None:
    """An ``AveragedModel`` holding the EMA copy of ``network`` (unwrapped), or None when ``decay`` is None/0.

    The first update copies the weights (AveragedModel's rule); later updates are
    ``ema = d·ema + (1 − d)·weights`` for parameters; buffers are copied (these UNets have no running
    statistics, and integer buffers cannot be averaged). ``ema.module`` is a plain copy of the network, used for
    validation and saved as the checkpoint's ``"ema"`` state dict.
    """
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
    return AveragedModel(unwrap(network), multi_avg_fn=_ema_update_fn(float(decay), warmup), use_buffers=False)


def evaluation_network(network: torch.nn.Module, ema: AveragedModel | None = None) -> torch.nn.Module:
    """What validation samples with: the EMA copy when there is one, else the (unwrapped) network."""
    return ema.module if ema is not None else unwrap(network)


def load_ema_state(ema: AveragedModel, state: dict[str, torch.Tensor], num_averaged: int) -> None:
    """Restore an EMA from a checkpoint's ``"ema"`` state dict; ``num_averaged`` > 0 keeps the next update from
    overwriting it with the raw weights (AveragedModel copies on its first update)."""
    ema.module.load_state_dict(state)
    ema.n_averaged.fill_(max(int(num_averaged), 1))
