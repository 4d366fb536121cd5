"""The diffusion config that travels with checkpoints and bundles: defaults, checks, and the factory.

``build_diffusion(config)`` is the one way configs become a :class:`GaussianDiffusion` (or, with ``respacing``, a
:class:`SpacedDiffusion`); ``resolve_clip`` turns ``clip_denoised: "auto"`` into the range for the training data.
Its own module so that ``clip`` (the clip rule) and ``respace`` (respacing) need not import each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .clip import AUTO, DEFAULT_AUTO_CLIP_MAX, auto_clip_range, is_auto, training_normalization
from .gaussian_diffusion import MODEL_MEAN_TYPES, MODEL_VAR_TYPES, GaussianDiffusion, normalize_clip_range
from .respace import SpacedDiffusion, space_timesteps
from .schedules import SCHEDULE_NAMES, get_named_beta_schedule

DIFFUSION_CONFIG_DEFAULTS: dict[str, Any] = {
    "schedule": "linear",
    "timesteps": 1000,
    "model_mean_type": "x0",
    "model_var_type": "fixed_large",
    "clip_denoised": AUTO,
    "auto_clip_max": DEFAULT_AUTO_CLIP_MAX,
    "rescale_timesteps": False,
    "respacing": None,
}


def normalize_diffusion_config(config: dict | None) -> dict[str, Any]:
    """The config with defaults filled in and values checked; JSON-serialisable (stored in checkpoints)."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(DIFFUSION_CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown diffusion config keys {unknown}; allowed: {sorted(DIFFUSION_CONFIG_DEFAULTS)}")
    merged = {**DIFFUSION_CONFIG_DEFAULTS, **config}
    if merged["schedule"] not in SCHEDULE_NAMES:
        raise ValueError(f"diffusion schedule must be one of {SCHEDULE_NAMES}, got {merged['schedule']!r}")
    if merged["model_mean_type"] not in MODEL_MEAN_TYPES:
        raise ValueError(f"model_mean_type must be one of {MODEL_MEAN_TYPES}, got {merged['model_mean_type']!r}")
    if merged["model_var_type"] not in MODEL_VAR_TYPES:
        raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}, got {merged['model_var_type']!r}")
    merged["timesteps"] = int(merged["timesteps"])
    if is_auto(merged["clip_denoised"]):
        merged["clip_denoised"] = AUTO
    else:
        clip = normalize_clip_range(merged["clip_denoised"])
        merged["clip_denoised"] = None if clip is None else [clip[0], clip[1]]
    merged["auto_clip_max"] = float(merged["auto_clip_max"])
    if not merged["auto_clip_max"] > 1.0:
        raise ValueError(
            f"auto_clip_max must be > 1 (a multiple of the normalization scale), got {merged['auto_clip_max']}"
        )
    merged["rescale_timesteps"] = bool(merged["rescale_timesteps"])
    if merged["respacing"] is not None:
        merged["respacing"] = str(merged["respacing"])
        space_timesteps(merged["timesteps"], merged["respacing"])  # validates
    return merged


def _clip_range(cfg: dict[str, Any]) -> tuple[float, float] | None:
    if is_auto(cfg["clip_denoised"]):
        return auto_clip_range(None, cfg["auto_clip_max"])
    return None if cfg["clip_denoised"] is None else tuple(cfg["clip_denoised"])


def build_diffusion(config: dict | None = None) -> GaussianDiffusion:
    """Build the diffusion from a plain dict (the ``config["diffusion"]`` that travels with checkpoints).

    Keys (all optional; defaults are the official M2Diff code's choices):
    - ``schedule``: "linear" (default) | "cosine".
    - ``timesteps``: T of the training chain (default 1000).
    - ``model_mean_type``: "x0" (default; M2Diff predicts x̂0) | "eps" (MFdiff / DDPM predict ε).
    - ``model_var_type``: "fixed_large" (default; M2Diff code) | "fixed_small" | "learned_range" (IDDPM, paper text;
      the network then outputs 2× channels).
    - ``clip_denoised``: "auto" (default: from the training data's normalization, see ``diffusion.clip``; unresolved
      here, i.e. without the data config, it means (−1, ``auto_clip_max``): never cut what the data may hold),
      [lo, hi] ([-1, 1] is the M2Diff code's), true (= [-1, 1]), false or null (no clamp).
    - ``auto_clip_max``: upper bound of "auto" for normalizations that leave values above 1 (``shared``): 10.
    - ``rescale_timesteps``: false (default) | true (network sees t·1000/T as float).
    - ``respacing``: null (default: all T steps) | "N" | "N1,N2,…" | "ddimN" (see ``space_timesteps``); the result
      is then a ``SpacedDiffusion`` whose network calls still use original timesteps.
    Unknown keys raise ValueError (typos would otherwise silently change the model).
    """
    cfg = normalize_diffusion_config(config)
    kwargs = dict(
        betas=get_named_beta_schedule(cfg["schedule"], cfg["timesteps"]),
        model_mean_type=cfg["model_mean_type"],
        model_var_type=cfg["model_var_type"],
        clip_denoised=_clip_range(cfg),
        rescale_timesteps=cfg["rescale_timesteps"],
    )
    if cfg["respacing"] is None:
        return GaussianDiffusion(**kwargs)
    return SpacedDiffusion(space_timesteps(cfg["timesteps"], cfg["respacing"]), **kwargs)


def resolve_clip(diffusion_config: Mapping[str, Any], data_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``diffusion_config`` (normalized) with ``clip_denoised: "auto"`` replaced by the concrete range for the
    training data's normalization; any other value is returned as it is."""
    config = normalize_diffusion_config(dict(diffusion_config))
    if is_auto(config["clip_denoised"]):
        lo, hi = auto_clip_range(training_normalization(data_config), config["auto_clip_max"])
        config["clip_denoised"] = [lo, hi]
    return config
