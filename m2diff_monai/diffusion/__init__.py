"""IDDPM Gaussian diffusion shared by M2Diff and MFdiff (one implementation; see docs/diffusion.md).

Public API:
- ``get_named_beta_schedule(name, T)``: β schedules ("linear", "cosine"), float64.
- ``normal_kl``, ``approx_standard_normal_cdf``, ``discretized_gaussian_log_likelihood``: differentiable VLB pieces.
- ``GaussianDiffusion``: q_sample, posteriors, p_mean_variance, training_losses / loss_terms, vb_terms_bpd.
- ``space_timesteps``, ``SpacedDiffusion``, ``respaced(diffusion, steps)``: respacing (``respace.py``).
- ``build_diffusion(config)``, ``normalize_diffusion_config``, ``resolve_clip``: the config factory (``config.py``).
- ``sample(diffusion, model_fn, shape, ...)``: ancestral / DDIM sampling with the network called at original t.
"""

from .clip import auto_clip_range, training_normalization
from .config import DIFFUSION_CONFIG_DEFAULTS, build_diffusion, normalize_diffusion_config, resolve_clip
from .gaussian_diffusion import GaussianDiffusion, check_max_timestep, mean_flat, normalize_clip_range
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from .respace import SpacedDiffusion, respaced, space_timesteps
from .samplers import SAMPLERS, ancestral_step, ddim_step, sample
from .schedules import betas_for_alpha_bar, get_named_beta_schedule

__all__ = [
    "check_max_timestep",
    "DIFFUSION_CONFIG_DEFAULTS",
    "SAMPLERS",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "ancestral_step",
    "approx_standard_normal_cdf",
    "auto_clip_range",
    "betas_for_alpha_bar",
    "build_diffusion",
    "ddim_step",
    "discretized_gaussian_log_likelihood",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "normalize_clip_range",
    "normalize_diffusion_config",
    "resolve_clip",
    "respaced",
    "sample",
    "space_timesteps",
    "training_normalization",
]
