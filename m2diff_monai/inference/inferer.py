"""The reverse-diffusion sampler as a MONAI ``Inferer``.

MONAI's ``SliceInferer`` drops extra positional and keyword arguments and draws independent noise per slice batch,
so it cannot pass timesteps and conditions to these networks. This inferer owns the sampling loop instead and takes
the conditions (LD PET slices, optional MRI slices and availability flags) explicitly, so bundle workflows, MONAI
evaluators and MONAI Deploy operators can call it like any other inferer: ``inferer(ld, network, mri=..., ...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from monai.inferers import Inferer

from m2diff_monai.diffusion import build_diffusion
from m2diff_monai.diffusion.samplers import SAMPLERS, sample
from m2diff_monai.engines.precision import cpu_has_native_bf16, resolve_precision  # noqa: F401 (re-exported)

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    """bf16/fp16 autocast on the given device, or a no-op when ``amp_dtype`` is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on a CUDA device or a CPU that supports it natively, fp32 elsewhere; ``bf16``/``fp16``/
    ``none`` as asked. Only the network runs under autocast: the sampler's state and updates stay fp32."""
    amp = (amp or "none").lower()
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "auto":
        return resolve_precision("auto", device)
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


class DiffusionSamplerInferer(Inferer):
    """Sample enhanced 2D slices conditioned on LD PET (and MRI) with any sampler of the diffusion core.

    Args:
        diffusion_config: the diffusion dict that travels with checkpoints (see ``build_diffusion``).
        sampler: ``"ancestral"`` (IDDPM ancestral sampling, respaced when ``steps`` < T) or ``"ddim"``.
        steps: number of sampling steps; ``None`` = all T steps (the papers' 1000-step sampler).
        eta: DDIM stochasticity (0 = deterministic).
        shared_noise: use the same initial (and per-step) noise for every slice of a batch; combined with a fixed
            ``seed`` every batch gets the same noise too, which reduces inter-slice flicker of a restacked volume.
        amp_dtype: autocast dtype for the network (``torch.bfloat16`` on recent GPUs), or None for fp32.
        seed: base seed; the i-th call after construction (or :meth:`reseed`) samples with ``seed + i``
            (``seed`` for every call with ``shared_noise``). None: torch's global generator.
        start_step: None (the papers: start from pure noise at T−1) or t₀: start from the LD PET noised to t₀ and
            run ``steps`` steps over [0, t₀] (truncated start, see ``diffusion.samplers.sample``). An ε-predicting
            model (MFdiff) trained briefly is unreliable at high t, where its x̂_0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ multiplies
            ε̂'s error by up to ~160; a truncated start never asks it there (docs/inference.md).

    Networks with ``is_diffusion = False`` (regression baselines) are called once with ``x_t = t = None``.
    Without MRI (``mri=None``) the network gets ``mri=None``: M2Diff then skips its MRI path altogether (same PET
    output as MRI flags of 0, less work).
    """

    def __init__(
        self,
        diffusion_config: dict[str, Any],
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        shared_noise: bool = False,
        amp_dtype: torch.dtype | None = None,
        seed: int | None = 0,
        progress: bool = False,
        start_step: int | None = None,
    ) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if steps is not None and int(steps) < 1:
            raise ValueError(f"steps must be >= 1 (or None for all T steps), got {steps}")
        self.diffusion_config = dict(diffusion_config)
        self.diffusion = build_diffusion({**self.diffusion_config, "respacing": None})
        if steps is not None and int(steps) > self.diffusion.num_timesteps:
            raise ValueError(f"steps {steps} exceeds the model's T = {self.diffusion.num_timesteps}")
        if start_step is not None:
            start_step = int(start_step)
            if not 0 < start_step < self.diffusion.num_timesteps:
                raise ValueError(f"start_step must be in 1..{self.diffusion.num_timesteps - 1}, got {start_step}")
            if steps is not None and int(steps) > start_step + 1:
                raise ValueError(f"steps {steps} exceeds the {start_step + 1} timesteps of a start at {start_step}")
        self.sampler = sampler
        self.steps = None if steps is None else int(steps)
        self.start_step = start_step
        self.eta = float(eta)
        self.shared_noise = shared_noise
        self.amp_dtype = amp_dtype
        self.seed = seed
        self.progress = progress
        self._calls = 0

    @classmethod
    def from_settings(
        cls, diffusion_config: dict[str, Any], settings: Any, device: torch.device
    ) -> DiffusionSamplerInferer:
        """The sampler ``settings`` ask for (an ``InferenceSettings``: sampler, steps, eta, start_step,
        shared_noise, amp, seed), with the autocast dtype ``amp`` resolves to on ``device``; one place for the CLI
        and the bundle inferer to build it."""
        return cls(
            diffusion_config,
            sampler=settings.sampler,
            steps=settings.steps,
            eta=settings.eta,
            start_step=settings.start_step,
            shared_noise=settings.shared_noise,
            amp_dtype=resolve_amp(settings.amp, device),
            seed=settings.seed,
        )

    def reseed(self, seed: int | None) -> None:
        """Start a new, reproducible sequence of calls (one draw of a whole volume)."""
        self.seed = seed
        self._calls = 0

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        offset = 0 if self.shared_noise else self._calls
        return torch.Generator(device=device).manual_seed(int(self.seed) + offset)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., Any],
        *args: Any,
        mri: torch.Tensor | None = None,
        mri_available: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``inputs``: normalized LD PET slices (B, 1, H, W). Returns the sampled x̂0 slices (B, 1, H, W)."""
        ld = inputs
        device = ld.device
        if mri is None:
            mri_available = None
        generator = self._generator(device)
        self._calls += 1

        if not getattr(network, "is_diffusion", True):
            with autocast_context(device, self.amp_dtype):
                out = network(None, None, ld=ld, mri=mri, mri_available=mri_available)["out"]
            return out[:, :1].float()

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast_context(device, self.amp_dtype):
                out = network(x_t, t, ld=ld, mri=mri, mri_available=mri_available)["out"]
            return out.float()

        return sample(
            self.diffusion,
            model_fn,
            tuple(ld.shape),
            sampler=self.sampler,
            steps=self.steps,
            eta=self.eta,
            generator=generator,
            device=device,
            progress=self.progress,
            shared_noise=self.shared_noise,
            start=None if self.start_step is None else ld,
            start_step=self.start_step,
        )
