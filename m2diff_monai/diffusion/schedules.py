"""Noise schedules (β_t) of IDDPM (Nichol & Dhariwal 2021, openai/improved-diffusion), in float64.

Why here: MONAI's schedulers own their schedule and their stepping; the hybrid loss, respacing and the shared
M2Diff/MFdiff sampler need the raw β array, so the schedule is a plain function of (name, T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SCHEDULE_NAMES = ("linear", "cosine")


def get_named_beta_schedule(name: str, num_diffusion_timesteps: int = 1000) -> np.ndarray:
    """β_0..β_{T−1} as float64.

    ``linear``: DDPM's 1e-4 … 0.02 at T=1000, scaled by 1000/T so any T gives a comparable total noise (IDDPM).
    ``cosine``: ᾱ(t) = cos²(((t/T) + 0.008)/1.008 · π/2), β_t = 1 − ᾱ((t+1)/T)/ᾱ(t/T), clipped at 0.999.
    """
    num_diffusion_timesteps = int(num_diffusion_timesteps)
    if num_diffusion_timesteps < 1:
        raise ValueError(f"number of diffusion timesteps must be >= 1, got {num_diffusion_timesteps}")
    if name == "linear":
        scale = 1000.0 / num_diffusion_timesteps
        if scale * 0.02 >= 1.0:
            raise ValueError(f"linear schedule needs T > 20 (β_end = 20/T < 1); got T={num_diffusion_timesteps}")
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {name!r}; expected one of {SCHEDULE_NAMES}")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous ᾱ(t), t∈[0, 1], into β_i = min(1 − ᾱ((i+1)/T)/ᾱ(i/T), max_beta)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)
