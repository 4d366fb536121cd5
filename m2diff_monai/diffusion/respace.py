"""Timestep respacing (IDDPM): which steps to keep, the chain on them, and :func:`respaced` (cached short chains).

Why here: MONAI's ``DDPMScheduler.set_timesteps(N < T)`` keeps stepping t → t−1 with the original β, which is
wrong for a shortened chain (oracle test: output std 0.878 instead of 0.5 at 100 steps). IDDPM instead keeps a
subset S = {t_0 < t_1 < …} of the original steps and recomputes β_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i−1}}, so that the
marginals q(x_{t_i} | x_0) are unchanged, and calls the network with the original t_i.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


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
            desired = int(text[len("ddim") :])
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


def respaced(diffusion: GaussianDiffusion, steps: int | str | None, start_step: int | None = None) -> GaussianDiffusion:
    """``diffusion``'s unspaced chain respaced to ``steps`` (int N, or an IDDPM string such as "ddim50"); cached on
    ``diffusion``. ``steps`` equal to the unspaced T returns ``diffusion`` itself when it is unspaced.

    ``start_step`` t₀ (an original timestep) truncates the chain to [0, t₀]: the ``steps`` (None = every step)
    are spread over 0..t₀ with both ends kept, so the chain starts at exactly t₀ (see ``sample``'s ``start``).
    A function here rather than a ``GaussianDiffusion`` method: the base class does not build its own subclass.
    """
    total = len(diffusion.base_betas)
    if start_step is not None:
        start_step = int(start_step)
        if not 0 <= start_step < total:
            raise ValueError(f"start_step must be an original timestep in 0..{total - 1}, got {start_step}")
    span = total if start_step is None else start_step + 1
    if steps is None:
        steps = span
    key = str(steps) if start_step is None else f"{steps}@{start_step}"
    cache = diffusion.respaced_cache
    if key not in cache:
        use = space_timesteps(span, str(steps))
        if len(use) == total and diffusion.num_timesteps == total:
            cache[key] = diffusion
        else:
            cache[key] = SpacedDiffusion(
                use,
                betas=diffusion.base_betas,
                model_mean_type=diffusion.model_mean_type,
                model_var_type=diffusion.model_var_type,
                clip_denoised=diffusion.clip_range,
                rescale_timesteps=diffusion.rescale_timesteps,
            )
    return cache[key]
