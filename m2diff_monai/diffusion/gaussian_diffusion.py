"""Gaussian diffusion (DDPM/IDDPM) on model outputs: forward noising, reverse-step parameters and the hybrid loss.

Why written here rather than taken from MONAI 1.6.1 (see docs/diffusion.md):
- MONAI has no differentiable variational bound (normal_kl, discretized NLL), so no IDDPM hybrid loss;
- ``DDPMScheduler.set_timesteps(N < T)`` is wrong for respacing (its ``step`` always goes to t−1: with an
  oracle denoiser on N(0, 0.5²) data the output std was 0.498 / 0.878 / 0.989 at 1000 / 100 / 10 steps);
- MONAI's ``learned_range`` interpolates the variance linearly; IDDPM interpolates in log space.
The math follows openai/improved-diffusion (Nichol & Dhariwal 2021); the code is our own.

The object never calls a network: it takes model outputs. ``t`` arguments are indices into *this* diffusion's
chain (0..num_timesteps−1); for a respaced diffusion (``respace.SpacedDiffusion``) the network must be called
with ``model_timesteps(t)``, the ORIGINAL timesteps it was trained on.

Schedule buffers are float64 numpy arrays (exact math); per call they are gathered from float32 tensors
(float64 when the input is float64) cached once per (device, dtype), so the sampling loop makes no host copies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from .losses import discretized_gaussian_log_likelihood, normal_kl

MODEL_MEAN_TYPES = ("x0", "eps")
_USE_DEFAULT = object()
MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")

_BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


def normalize_clip_range(clip_denoised) -> tuple[float, float] | None:
    """``True`` → (−1, 1); ``False``/``None`` → no clipping; a pair (lo, hi) → that range."""
    if clip_denoised is None or clip_denoised is False:
        return None
    if clip_denoised is True:
        return (-1.0, 1.0)
    try:
        lo, hi = (float(v) for v in clip_denoised)
    except (TypeError, ValueError) as err:
        raise ValueError(f"clip_denoised must be a bool, None or a pair (lo, hi); got {clip_denoised!r}") from err
    if not lo < hi:
        raise ValueError(f"clip_denoised range must have lo < hi; got {(lo, hi)}")
    return (lo, hi)


def check_max_timestep(max_timestep: int, num_timesteps: int) -> int:
    """``max_timestep`` as an int in 0..T−1, or a one-line ``ValueError`` naming the range."""
    value = int(max_timestep)
    if value != max_timestep or not 0 <= value < num_timesteps:
        raise ValueError(f"max_timestep must be an integer in 0..{num_timesteps - 1}, got {max_timestep!r}")
    return value


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: one value per sample."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


class GaussianDiffusion:
    """DDPM forward process q and IDDPM reverse-step parameterisation p_θ, driven by model outputs.

    Args:
        betas: β_0..β_{T−1} (1-D, in (0, 1]); see ``schedules.get_named_beta_schedule``.
        model_mean_type: what the network's first channels predict: ``"x0"`` (M2Diff) or ``"eps"`` (MFdiff, DDPM).
        model_var_type: ``"fixed_small"`` (σ² = β̃_t, posterior variance), ``"fixed_large"`` (σ² = β_t, with
            β̃_1 at t = 0 as IDDPM) or ``"learned_range"`` (network outputs 2× channels: [mean part, v] with
            log σ² = f·log β_t + (1−f)·log β̃_t, f = (v+1)/2, log β̃ clipped as IDDPM).
        clip_denoised: range the predicted x0 is clamped to in the reverse process (True = (−1, 1); False/None =
            no clamp). M2Diff's official code clamps to [−1, 1] although data are in [0, 1].
        rescale_timesteps: if True, ``model_timesteps`` returns float t·1000/T_original (IDDPM option).
        timestep_map: original timestep of each index of this chain (set by ``SpacedDiffusion``).
    """

    def __init__(
        self,
        betas,
        model_mean_type: str = "x0",
        model_var_type: str = "fixed_large",
        clip_denoised: bool | tuple[float, float] | None = (-1.0, 1.0),
        rescale_timesteps: bool = False,
        timestep_map: Iterable[int] | None = None,
    ):
        if model_mean_type not in MODEL_MEAN_TYPES:
            raise ValueError(f"model_mean_type must be one of {MODEL_MEAN_TYPES}, got {model_mean_type!r}")
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"model_var_type must be one of {MODEL_VAR_TYPES}, got {model_var_type!r}")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError("betas must be a non-empty 1-D array")
        if not (np.all(betas > 0) and np.all(betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.clip_range = normalize_clip_range(clip_denoised)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.num_timesteps = int(betas.shape[0])

        if timestep_map is None:
            self.timestep_map = np.arange(self.num_timesteps, dtype=np.int64)
        else:
            self.timestep_map = np.asarray(list(timestep_map), dtype=np.int64)
            if self.timestep_map.shape != (self.num_timesteps,):
                raise ValueError("timestep_map must have one entry per beta")
        # Overridden by SpacedDiffusion (the unspaced chain it was cut from); used by respace.respaced and rescaling.
        self.base_betas = betas
        self.original_num_timesteps = int(self.timestep_map.max()) + 1

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t−1} | x_t, x_0) = N(coef1·x_0 + coef2·x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is clipped to log β̃_1 (IDDPM); a one-step chain has no β̃_1, so β_0 is used.
        first_nonzero = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first_nonzero, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # fixed_large: σ² = β_t, except β̃_1 at t = 0 so the last step's log-likelihood is sane (IDDPM).
        self.fixed_large_variance = np.append(first_nonzero, betas[1:])
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)

        self._tensor_cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}
        # Chains respace.respaced cut from this one (kept here so they live as long as this diffusion).
        self.respaced_cache: dict[str, GaussianDiffusion] = {}

    # ------------------------------------------------------------------ buffers
    def _buffers(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (torch.device(device), dtype)
        cached = self._tensor_cache.get(key)
        if cached is None:
            # Built outside inference mode even when first used by a sampler under torch.inference_mode(): an
            # inference tensor cached here would break a later training step ("cannot be saved for backward").
            with torch.inference_mode(False):
                cached = {name: torch.tensor(getattr(self, name), dtype=dtype, device=device) for name in _BUFFER_NAMES}
                cached["timestep_map"] = torch.tensor(self.timestep_map, dtype=torch.long, device=device)
            self._tensor_cache[key] = cached
        return cached

    def _extract(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Gather buffer ``name`` at ``t`` (shape (B,)) and view it as (B, 1, …, 1) to broadcast against ``like``."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        values = self._buffers(like.device, dtype)[name][t.to(device=like.device, dtype=torch.long)]
        return values.view(values.shape[0], *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ helpers
    def model_output_channels(self, out_channels_base: int = 1) -> int:
        """Channels the network must output: ``out_channels_base``, doubled when the variance is learned."""
        return out_channels_base * (2 if self.model_var_type == "learned_range" else 1)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timesteps to give the network for chain indices ``t``: the ORIGINAL 0..T−1 steps (long), or floats
        t·1000/T_original when ``rescale_timesteps``."""
        mapped = self._buffers(t.device, torch.float32)["timestep_map"][t.long()]
        if self.rescale_timesteps:
            return mapped.float() * (1000.0 / self.original_num_timesteps)
        return mapped

    def sample_timesteps(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        max_timestep: int | None = None,
    ) -> torch.Tensor:
        """Uniform t ∈ {0..T−1} per sample (IDDPM's uniform schedule sampler), or t ∈ {0..max_timestep}: a model
        that is only ever sampled from a truncated start at t0 ≤ max_timestep (not in the papers) then spends all
        its training on the steps it will be asked to take."""
        high = self.num_timesteps
        if max_timestep is not None:
            high = check_max_timestep(max_timestep, self.num_timesteps) + 1
        return torch.randint(0, high, (batch_size,), device=device, generator=generator)

    def split_model_output(self, model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean part, variance-interpolation part or None): channels [mean part, v] when the variance is learned."""
        if self.model_var_type != "learned_range":
            return model_output, None
        if model_output.shape[1] % 2:
            raise ValueError(
                f"learned_range needs an even number of output channels ([mean part, v]); got {model_output.shape[1]}"
            )
        mean_part, v = torch.split(model_output, model_output.shape[1] // 2, dim=1)
        return mean_part, v

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(√ᾱ_t·x_0, 1 − ᾱ_t): returns (mean, variance, log_variance)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t−1} | x_t, x_0): returns (mean, variance β̃_t, log variance clipped at t = 0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process
    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    def predict_xstart(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂_0 implied by the model output (not clamped; differentiable), e.g. for M2Diff's L_bias."""
        mean_part, _ = self.split_model_output(model_output)
        return mean_part if self.model_mean_type == "x0" else self.predict_xstart_from_eps(x_t, t, mean_part)

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool | tuple[float, float] | None | object = _USE_DEFAULT,
    ) -> dict[str, torch.Tensor]:
        """Parameters of p_θ(x_{t−1} | x_t): dict(mean, variance, log_variance, pred_xstart).

        ``model_output`` is the network's output at (x_t, model_timesteps(t)). pred_xstart is clamped to the
        diffusion's clip range (or ``clip_denoised`` when given) before the posterior mean is formed.
        """
        mean_part, v = self.split_model_output(model_output)
        if mean_part.shape != x_t.shape:
            raise ValueError(
                f"model output mean part has shape {tuple(mean_part.shape)}, x_t has {tuple(x_t.shape)} "
                f"(model_var_type={self.model_var_type!r} expects {self.model_output_channels(x_t.shape[1])} channels)"
            )
        if self.model_var_type == "learned_range":
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == "fixed_small":
                variance = self._extract("posterior_variance", t, x_t)
                log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
            else:
                variance = self._extract("fixed_large_variance", t, x_t)
                log_variance = self._extract("fixed_large_log_variance", t, x_t)
            variance = variance.expand_as(x_t)
            log_variance = log_variance.expand_as(x_t)

        pred_xstart = mean_part if self.model_mean_type == "x0" else self.predict_xstart_from_eps(x_t, t, mean_part)
        clip_range = self.clip_range if clip_denoised is _USE_DEFAULT else normalize_clip_range(clip_denoised)
        if clip_range is not None:
            pred_xstart = pred_xstart.clamp(*clip_range)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        clip_denoised: bool | tuple[float, float] | None = False,
    ) -> dict[str, torch.Tensor]:
        """One term of the variational bound per sample, in bits/dim: KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t)) for
        t > 0 and the discretized Gaussian NLL of x_0 for t = 0. Returns dict(output, pred_xstart)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t.to(kl.device) == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vlb_weight: float = 0.001,
    ) -> dict[str, torch.Tensor]:
        """Per-sample loss terms (each shape (B,)) for one model output; see ``loss_terms``."""
        return self.loss_terms(model_output, x_start, x_t, t, noise, vlb_weight=vlb_weight)

    def loss_terms(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        vlb_weight: float = 0.001,
    ) -> dict[str, torch.Tensor]:
        """IDDPM hybrid loss terms for one output branch, per sample: dict(loss, mse, vlb, pred_xstart).

        - ``mse``: mean squared error of the mean part to its target (x_0 or ε, by ``model_mean_type``) — L_simple.
        - ``vlb``: the bound term L_t in bits/dim for the drawn t, computed with the mean part detached
          (stop-gradient: the bound trains only the variance). Zero when the variance is not learned.
        - ``loss`` = mse + vlb_weight·T·vlb. IDDPM's L_hybrid = L_simple + λ·L_vlb with L_vlb = Σ_t L_t, which a
          uniformly drawn t estimates as T·L_t; with λ = 0.001 this is IDDPM's code (vb·T/1000, RESCALED_MSE).
        - ``pred_xstart``: x̂_0 of this branch (unclamped, with gradient), e.g. for M2Diff's L_bias.

        A multi-branch network (M2Diff: PET and MRI decoders) calls this once per branch; the weighting
        λ1(L_pet + L_mri) + λ2·L_bias lives in the training engine.
        """
        mean_part, v = self.split_model_output(model_output)
        if mean_part.shape != x_start.shape:
            raise ValueError(
                f"model output mean part has shape {tuple(mean_part.shape)}, x_start has {tuple(x_start.shape)}"
            )
        target = x_start if self.model_mean_type == "x0" else noise
        mse = mean_flat((target - mean_part) ** 2)
        if v is not None:
            frozen = torch.cat([mean_part.detach(), v], dim=1)
            vlb = self.vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            loss = mse + (vlb_weight * self.num_timesteps) * vlb
        else:
            vlb = torch.zeros_like(mse)
            loss = mse
        pred_xstart = mean_part if self.model_mean_type == "x0" else self.predict_xstart_from_eps(x_t, t, mean_part)
        return {"loss": loss, "mse": mse, "vlb": vlb, "pred_xstart": pred_xstart}
