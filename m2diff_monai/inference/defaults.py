"""Where each inference setting comes from: what was evaluated is what a user gets.

A training config may declare ``inference_defaults`` (train.json, null by default; the demo overlays set the
sampler their scripts evaluate with). ``checkpoint_config`` stores them in every checkpoint as
``config["inference_defaults"]``, so ``m2diff-infer --checkpoint CKPT`` with no sampler flag samples exactly as the
run was evaluated, and ``m2diff-export`` writes them into the exported ``inference.json``.

Precedence, highest first (the ``sources`` of a resolved setting name the layer):

1. ``option``: an explicit ``m2diff-infer`` flag, or a non-null top-level key of a bundle's ``inference.json``
   (``python -m monai.bundle run inference ... --steps 20`` sets one);
2. ``checkpoint``: the checkpoint's ``inference_defaults``;
3. ``bundle``: the bundle's ``sampling_defaults`` block (and, for ``m2diff-infer --bundle``, the literal top-level
   keys that are not sampler settings: ``batch_size``, ``device``, ...);
4. ``default``: :class:`m2diff_monai.inference.settings.InferenceSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2diff_monai.inference.settings import InferenceSettings

# What a checkpoint may fix: how the prediction is sampled and fused. Not the machine (device, amp, batch size),
# not the outputs (png, save_orientations), not the weights.
INFERENCE_DEFAULT_KEYS: tuple[str, ...] = (
    "sampler",
    "steps",
    "eta",
    "start_step",
    "orientations",
    "fusion",
    "samples",
    "shared_noise",
    "ld_consistency_fwhm",
)
# The bundles' inference.json keep these null at the top level (null = "not set": the checkpoint's value or the
# ``sampling_defaults`` block applies) so that a bundle run and ``m2diff-infer`` resolve them the same way.
SAMPLING_DEFAULTS_KEY = "sampling_defaults"


def check_inference_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated ``inference_defaults`` (``{}`` for None): keys among :data:`INFERENCE_DEFAULT_KEYS`, values that
    :class:`InferenceSettings` accepts. Returned as given (JSON-serialisable), ValueError otherwise."""
    if defaults is None:
        return {}
    if not isinstance(defaults, Mapping):
        raise ValueError(f"inference_defaults must be a dict or null, got {type(defaults).__name__}")
    out = {str(k): v for k, v in defaults.items()}
    unknown = sorted(set(out) - set(INFERENCE_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"unknown inference_defaults keys {unknown}; allowed: {list(INFERENCE_DEFAULT_KEYS)}")
    try:
        InferenceSettings(**{k: v for k, v in out.items() if v is not None})
    except (TypeError, ValueError) as err:
        raise ValueError(f"inference_defaults: {err}") from None
    if isinstance(out.get("orientations"), (list, tuple)):
        out["orientations"] = list(out["orientations"])
    return out


def check_stored_defaults(defaults: Mapping[str, Any] | None, path: str | Path | None = None) -> dict[str, Any]:
    """A checkpoint's stored ``inference_defaults`` checked (:func:`check_inference_defaults`); a bad value is one
    InputError line naming the checkpoint."""
    from m2diff_monai.errors import InputError

    try:
        return check_inference_defaults(defaults)
    except ValueError as err:
        raise InputError(f"invalid inference_defaults in the checkpoint ({err})", path=path) from None


# In stored defaults, null has a meaning for these two settings (InferenceSettings spells it so).
STATED_NULLS = {"steps": "all", "start_step": "none"}


def layered_settings(
    bundle: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the layers (lowest first: ``bundle``, ``checkpoint``, ``options``); None means "not set", except in
    the checkpoint's stored defaults, where ``steps: null`` states the full chain and ``start_step: null`` pure
    noise (:data:`STATED_NULLS`). Returns ``(values, sources)``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name, layer in (("bundle", bundle), ("checkpoint", checkpoint), ("option", options)):
        for key, value in dict(layer or {}).items():
            if value is None and name == "checkpoint":
                value = STATED_NULLS.get(key)
            if value is None or (isinstance(value, str) and value == ""):
                continue
            values[key] = value
            sources[key] = name
    return values, sources
