"""Mixed precision for training on any device: a MONAI ``Inferer`` that runs the forward under autocast.

``SupervisedTrainer(amp=True)`` autocasts with ``torch.autocast("cuda")`` only; on CPU it warns and runs fp32.
CPUs with AMX / AVX512-BF16 train these UNets several times faster in bf16 (``benchmarks/bench_training.py``),
so the bundle autocasts in the trainer's inferer instead, on the device of the inputs. bf16 needs no loss
scaling; fp16 (CUDA) additionally sets the trainer's ``amp=True`` so its ``GradScaler`` scales the loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from m2diff_monai.engines.precision import precision_label, resolve_precision
from m2diff_monai.engines.workflow import amp_dtype

logger = logging.getLogger(__name__)


def _device_of(inputs: Any, kwargs: dict[str, Any]) -> torch.device:
    for value in (inputs, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class AutocastInferer(Inferer):
    """``network(inputs, *args, **kwargs)`` under ``torch.autocast(device, dtype)``; ``dtype`` None = fp32.

    Args:
        dtype: "auto" (bf16 where the inputs' device computes it natively, else fp32: ``engines.precision``),
            "bfloat16", "float16" or None. The first call logs the precision and thread count used.
    """

    def __init__(self, dtype: str | None = "auto") -> None:
        self.name = dtype
        resolve_precision(dtype, "cpu")  # validate the name now, not at the first iteration
        self._resolved: dict[str, torch.dtype | None] = {}

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype on the default device (what the first call will most likely use)."""
        return amp_dtype(self.name)

    def __call__(self, inputs: Any, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        device_type = _device_of(inputs, kwargs).type
        if device_type not in self._resolved:
            dtype = self._resolved[device_type] = resolve_precision(self.name, device_type)
            logger.info(
                "training precision: %s autocast on %s (asked: %s), %d torch threads",
                precision_label(dtype),
                device_type,
                self.name,
                torch.get_num_threads(),
            )
        dtype = self._resolved[device_type]
        context = contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)
        with context:
            return network(inputs, *args, **kwargs)


def needs_grad_scaler(dtype: str | None) -> bool:
    """fp16 needs loss scaling (the trainer's ``amp=True`` makes a GradScaler); bf16 and fp32 do not ("auto" never
    picks fp16)."""
    return amp_dtype(dtype) == torch.float16
