"""Timestep respacing (IDDPM) and the diffusion factory used by configs and checkpoints.

Why here: MONAI's ``DDPMScheduler.set_timesteps(N < T)`` keeps stepping t → t−1 with the original β, which is
wrong for a shortened chain (oracle test: output std 0.878 instead of 0.5 at 100 steps). IDDPM instead keeps a
subset S = {t_0 < t_1 < …} of the original steps and recomputes β_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, so that the
marginals q(x_{t_i} | x_0) are unchanged, and calls the network with the original t_i.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .clip import AUTO, DEFAULT_AUTO_CLIP_MAX, auto_clip_range, is_auto
from .gaussian_diffusion import MODEL_MEAN_TYPES, MODEL_VAR_TYPES, GaussianDiffusion, normalize_clip_range
from .schedules import SCHEDULE_NAMES, get_named_beta_schedule


def space_timesteps(num_timesteps: int, section_counts: int | str | Iterable[int]) -> list[int]:
    """Original timesteps to keep, sorted ascending (IDDPM semantics; IDDPM returns the same steps as a set).

    ``section_counts``:
    - an int N or the string "N": N steps spread evenly over [0, T−1], both ends included (round(i·(T−1)/(N−1)));
    - "N1,N2,…" or a list: the chain is cut into len(list) equal sections, section k evenly strided to N_k steps
      (e.g. T=300, "10,15,20" → 10 steps in 0..99, 15 in 100..199, 20 in 200..299);
    - "ddimN": the DDIM paper's fixed stride range(0, T, s) with the smallest integer stride s giving exactly N
      steps (ValueError when no stride does).
    """
    num_timesteps = int(num_timesteps)
    if isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    elif isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            desired = int(text[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                steps = list(range(0, num_timesteps, stride))
                if len(steps) == desired:
                    return steps
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
        counts = [int(x) for x in text.split(",")]
    else:
        counts = [int(x) for x in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section counts must be positive integers, got {section_counts!r}")
    size_per, extra = divmod(num_timesteps, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion on a subset of an unspaced chain's timesteps.

    ``kwargs`` are the unspaced chain's ``GaussianDiffusion`` arguments (``betas`` = the full schedule).
    ``model_timesteps(i)`` maps index i of the short chain to the original step, so a network trained on 0..T−1
    is always called with the timesteps it knows.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any):
        base_betas = np.asarray(kwargs.pop("betas"), dtype=np.float64)
        kwargs.pop("timestep_map", None)
        use = sorted({int(t) for t in use_timesteps})
        if not use or use[0] < 0 or use[-1] >= len(base_betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{len(base_betas) - 1}")
        alphas_cumprod = np.cumprod(1.0 - base_betas)
        kept_alphas_cumprod = alphas_cumprod[use]
        previous = np.append(1.0, kept_alphas_cumprod[:-1])
        new_betas = 1.0 - kept_alphas_cumprod / previous
        self.use_timesteps = use
        super().__init__(new_betas, timestep_map=use, **kwargs)
        self.base_betas = base_betas
        self.original_num_timesteps = len(base_betas)


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
        raise ValueError(f"auto_clip_max must be > 1 (a multiple of the normalization scale), got {merged['auto_clip_max']}")
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
