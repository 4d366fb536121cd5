"""Reverse-process samplers shared by M2Diff and MFdiff: ancestral (DDPM/IDDPM) and DDIM with η.

Why here: MONAI's ``DDPMScheduler`` cannot respace (see ``respace``), and neither MONAI scheduler understands the
IDDPM learned-range variance; one loop over ``GaussianDiffusion`` serves every parameterisation, every variance
type and any step count, and always calls the network with the ORIGINAL timesteps.

``model_fn(x_t, t) -> Tensor``: ``t`` is a LongTensor (B,) of original timesteps (0..T−1) — bind the
conditions (LD PET, MRI, …) in a closure. The output has 1×C or 2×C channels (learned variance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .gaussian_diffusion import GaussianDiffusion
from .respace import respaced

SAMPLERS = ("ancestral", "ddim")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, t_original, x_t_after_step, pred_xstart): step_index counts down from N−1 to 0.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def ancestral_step(
    diffusion: GaussianDiffusion, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t−1} = μ_θ + σ_θ·z (no noise at t = 0). Returns (x_{t−1}, pred_xstart)."""
    out = diffusion.p_mean_variance(model_output, x_t, t)
    log_variance = out["log_variance"]
    if diffusion.model_var_type != "learned_range":
        # fixed variances are one value per sample (an expanded view): exp on (B, 1, …) rather than on every pixel
        log_variance = log_variance[(slice(None),) + (slice(0, 1),) * (x_t.ndim - 1)]
    nonzero = (t != 0).to(out["mean"].dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return out["mean"] + (nonzero * torch.exp(0.5 * log_variance)) * noise, out["pred_xstart"]


def ddim_step(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM update (Song et al. 2021, as IDDPM's ``ddim_sample``): ε is re-derived from the (clamped) x̂_0, then
    x_{t−1} = √ᾱ_{t−1}·x̂_0 + √(1 − ᾱ_{t−1} − σ²)·ε̂ + σ·z with σ = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_{t−1}).
    η = 0 is deterministic; η = 1 uses the posterior variance β̃ (ancestral with ``fixed_small``).
    The learned variance, if any, is ignored. Returns (x_{t−1}, pred_xstart)."""
    out = diffusion.p_mean_variance(model_output, x_t, t)
    pred_xstart = out["pred_xstart"]
    eps = diffusion.predict_eps_from_xstart(x_t, t, pred_xstart)
    alpha_bar = diffusion._extract("alphas_cumprod", t, x_t)
    alpha_bar_prev = diffusion._extract("alphas_cumprod_prev", t, x_t)
    sigma = eta * torch.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * torch.sqrt(1.0 - alpha_bar / alpha_bar_prev)
    mean = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt((1.0 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * eps
    nonzero = (t != 0).to(mean.dtype).view(-1, *([1] * (x_t.ndim - 1)))
    return mean + nonzero * sigma * noise, pred_xstart


def _randn(
    shape: Sequence[int],
    shared: bool,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if not shared:
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    one = torch.randn((1, *shape[1:]), generator=generator, device=device, dtype=dtype)
    return one.expand(tuple(shape))


def _chain_start(
    chain: GaussianDiffusion,
    shape: tuple[int, ...],
    noise: torch.Tensor | None,
    start: torch.Tensor | None,
    shared_noise: bool,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The chain's first x: x_T (``noise`` or a fresh draw), or x_{t0} = q_sample(``start``, t0) with it as ε."""
    if noise is None:
        x = _randn(shape, shared_noise, generator, device, dtype)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {shape}")
        x = noise.to(device=device, dtype=dtype)
    if shared_noise:
        x = x[:1].expand(shape)
    if start is not None:
        if tuple(start.shape) != shape:
            raise ValueError(f"start shape {tuple(start.shape)} != requested shape {shape}")
        first = torch.full((shape[0],), chain.num_timesteps - 1, dtype=torch.long, device=device)
        x = chain.q_sample(start.to(device=device, dtype=dtype), first, x)
    return x.contiguous()


def sample(
    diffusion: GaussianDiffusion,
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    steps: int | str | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    shared_noise: bool = False,
    callback: StepCallback | None = None,
    start: torch.Tensor | None = None,
    start_step: int | None = None,
) -> torch.Tensor:
    """Draw x_0 by running the reverse chain from x_T ~ N(0, I), or from a noised ``start`` image at ``start_step``.

    Args:
        diffusion: the (training) diffusion; its variance type, parameterisation and clip range are used.
        model_fn: ``model_fn(x_t, t_original) -> model output``; called under ``torch.no_grad()`` (wrap the call
            to ``sample`` in autocast for mixed precision; x is kept in ``dtype`` between steps).
        shape: (B, C, H, W) (any (B, …) works) of the sample.
        sampler: "ancestral" (DDPM/IDDPM p_θ with the diffusion's variance) or "ddim" (with ``eta``).
        steps: None = the diffusion's own chain (all T steps unless it is already respaced); an int N (or an
            IDDPM respacing string, e.g. "ddim50") = the unspaced chain respaced to N steps (cached on
            ``diffusion``), steps spread evenly over [0, T−1] with both ends kept.
        eta: DDIM noise scale (0 = deterministic; 1 ≈ ancestral with posterior variance).
        noise: x_T to start from (else drawn with ``generator``).
        generator: torch.Generator for x_T and the per-step noise (on ``device``).
        device: defaults to ``noise.device`` if given, else CPU.
        progress: show a tqdm bar over the steps.
        shared_noise: one noise image for the whole batch (x_T and every step's noise), e.g. adjacent slices of a
            volume so they follow the same noise path (inter-slice consistency); with ``noise`` given, its first
            element is used for every batch element.
        callback: ``callback(step_index, t_original, x, pred_xstart)`` after each step.
        start, start_step: truncated start for conditional restoration ("come-closer-diffuse-faster", Chung et al.
            CVPR 2022; SDEdit): x_{t₀} = q_sample(``start``, t₀) with t₀ = ``start_step`` (an original timestep)
            and ``noise`` (or a fresh draw) as its ε, then the reverse chain over [0, t₀] with ``steps`` steps.
            ``start`` is an estimate of x_0 (the LD PET for a denoiser). Not in either paper: their samplers start
            from pure noise (``start_step=None``, the default).
    Returns:
        x_0 (shape ``shape``, dtype ``dtype``), clamped to the diffusion's clip range when it has one.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if (start is None) != (start_step is None):
        raise ValueError("a truncated start needs both start (the x_0 estimate) and start_step (t0)")
    if start_step is None:
        chain = diffusion if steps is None else respaced(diffusion, steps)
    else:
        chain = respaced(diffusion, steps, start_step=start_step)
    shape = tuple(int(s) for s in shape)
    if device is None:
        device = noise.device if noise is not None else torch.device("cpu")
    device = torch.device(device)

    with torch.no_grad():
        x = _chain_start(chain, shape, noise, start, shared_noise, generator, device, dtype)
        indices = range(chain.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"{sampler} sampling", leave=False)
        zero = torch.zeros((), device=device, dtype=dtype)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            t_model = chain.model_timesteps(t)
            model_output = model_fn(x, t_model)
            stochastic = i > 0 and (sampler == "ancestral" or eta != 0.0)  # t = 0 and DDIM η = 0 add no noise
            step_noise = _randn(shape, shared_noise, generator, device, dtype) if stochastic else zero
            if sampler == "ancestral":
                x, pred_xstart = ancestral_step(chain, model_output, x, t, step_noise)
            else:
                x, pred_xstart = ddim_step(chain, model_output, x, t, step_noise, eta=eta)
            x = x.to(dtype)
            if callback is not None:
                callback(i, t_model, x, pred_xstart)
        if chain.clip_range is not None:
            x = x.clamp(*chain.clip_range)
    return x
