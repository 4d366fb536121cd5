"""Volume inference: the sampler as a MONAI Inferer, three-orientation sampling and fusion, ``m2diff-infer``.

Entry points: :func:`m2diff_monai.inference.api.infer_subject` (raw NIfTI in, NIfTI out on the input's grid),
:func:`m2diff_monai.inference.api.infer_manifest` (a preprocessed cohort), ``m2diff-infer`` (:mod:`.cli`).
Names are imported lazily so that ``import m2diff_monai.inference.fusion`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiffusionSamplerInferer": "inferer",
    "VolumePrediction": "volume",
    "predict_orientation": "volume",
    "predict_volume": "volume",
    "fuse_volumes": "fusion",
    "LoadedModel": "m2diff_monai.checkpoint",
    "load_model": "m2diff_monai.checkpoint",
    "InferenceSettings": "settings",
    "infer_subject": "api",
    "infer_manifest": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        return getattr(importlib.import_module(module if "." in module else f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
