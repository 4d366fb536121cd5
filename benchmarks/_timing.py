"""Timing helpers shared by the training benchmarks (bench_training.py, bench_mfdiff.py).

The benchmarks run as scripts, so their folder is on ``sys.path`` and ``import _timing`` works from them.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock times cover it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(trainer: Any, device: torch.device, warmup: int) -> list[float]:
    """Run an ignite/MONAI trainer and return the seconds of each iteration after the first ``warmup``."""
    from ignite.engine import Events

    times: list[float] = []
    marks: dict[str, float] = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _start(engine):
        sync(device)
        marks["t"] = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _stop(engine):
        sync(device)
        if engine.state.iteration > warmup:
            times.append(time.perf_counter() - marks["t"])

    trainer.run()
    return times


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"step_s_median": ordered[len(ordered) // 2], "step_s_min": ordered[0]}
