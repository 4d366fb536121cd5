"""Default numeric precision that is never slower than fp32 on the machine it runs on.

bf16 autocast pays off only where the hardware computes in bf16: CUDA GPUs that support it
(``torch.cuda.is_bf16_supported()``) and CPUs with AVX512-BF16 or AMX-BF16 units. On other CPUs oneDNN emulates
bf16 and one demo training step ran ~20× slower than fp32 (2-core AVX2 machine, docs/training.md). ``"auto"``
(the bundles' and the inference CLI's default) therefore picks bf16 only on such hardware, fp32 elsewhere; an
explicit dtype always wins.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = [
    "PRECISION_NAMES",
    "NATIVE_BF16_CPU_FLAGS",
    "cpu_flags",
    "cpu_has_native_bf16",
    "resolve_precision",
    "precision_label",
    "runtime_record",
]

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# Accepted spellings (bundle keys use torch names, the inference CLI the short ones).
PRECISION_NAMES: dict[str, torch.dtype | None] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "none": None,
    "fp32": None,
    "float32": None,
}


@functools.lru_cache(maxsize=1)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where the file does not exist,
    e.g. macOS or Windows: those get fp32 under ``auto``)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16), where bf16 autocast is faster."""
    return any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(name: str | None, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``name`` on ``device``; None = fp32.

    ``"auto"``: bf16 on a CUDA device that supports it or on a CPU with native bf16, else fp32. ``"bfloat16"``/
    ``"bf16"``, ``"float16"``/``"fp16"``, ``None``/``""``/``"none"``/``"fp32"``: as asked (explicit values win).
    """
    if name is None or (isinstance(name, str) and not name.strip()):
        return None
    key = str(name).strip().lower()
    if key == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None
        if device.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return None
    if key not in PRECISION_NAMES:
        raise ValueError(f"amp dtype (precision) must be auto, {', '.join(PRECISION_NAMES)} or null, got {name!r}")
    return PRECISION_NAMES[key]


def precision_label(dtype: torch.dtype | None) -> str:
    """ "bf16" / "fp16" / "fp32" for logs and run summaries."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def runtime_record(name: str | None, device: torch.device | str) -> dict[str, object]:
    """What ran, for run summaries: ``{"precision": "bf16"|"fp16"|"fp32", "threads": torch's CPU threads}``."""
    return {"precision": precision_label(resolve_precision(name, device)), "threads": torch.get_num_threads()}
