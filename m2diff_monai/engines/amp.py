"""Mixed precision for training on any device: a MONAI ``Inferer`` that runs the forward under autocast.

``SupervisedTrainer(amp=True)`` autocasts with ``torch.autocast("cuda")`` only; on CPU it warns and runs fp32.
CPUs with AMX / AVX512-BF16 train these UNets several times faster in bf16 (``benchmarks/bench_training.py``),
so the bundle autocasts in the trainer's inferer instead, on the device of the inputs. bf16 needs no loss
scaling; fp16 (CUDA) additionally sets the trainer's ``amp=True`` so its ``GradScaler`` scales the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from m2diff_monai.engines.workflow import amp_dtype


def _device_of(inputs: Any, kwargs: dict[str, Any]) -> torch.device:
    for value in (inputs, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class AutocastInferer(Inferer):
    """``network(inputs, *args, **kwargs)`` under ``torch.autocast(device, dtype)``; ``dtype`` None = fp32.

    Args:
        dtype: "bfloat16", "float16" or None.
    """

    def __init__(self, dtype: str | None = "bfloat16") -> None:
        self.dtype = amp_dtype(dtype)

    def __call__(self, inputs: Any, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.dtype is None:
            context = contextlib.nullcontext()
        else:
            context = torch.autocast(_device_of(inputs, kwargs).type, dtype=self.dtype)
        with context:
            return network(inputs, *args, **kwargs)


def needs_grad_scaler(dtype: str | None) -> bool:
    """fp16 needs loss scaling (the trainer's ``amp=True`` makes a GradScaler); bf16 and fp32 do not."""
    return amp_dtype(dtype) == torch.float16
