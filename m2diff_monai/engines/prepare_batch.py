"""``prepare_batch`` callables for MONAI engines: manifest batches → (inputs, targets, args, kwargs).

MONAI's own ``DiffusionPrepareBatch`` cannot be used: it draws timesteps from a MONAI scheduler, passes the
condition by concatenation or ``context`` and returns ε as the target. These networks take ``ld``, ``mri`` and
``mri_available`` as keyword conditions and the loss needs x_0, x_t, t and the noise.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch


def _to(value: torch.Tensor, device: Any, non_blocking: bool, channels_last: bool) -> torch.Tensor:
    value = value.to(device=device, non_blocking=non_blocking)
    if channels_last and value.ndim == 4:
        value = value.contiguous(memory_format=torch.channels_last)
    return value


def mri_dropout_flags(
    available: torch.Tensor, drop_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-sample MRI flags: the data's availability AND a Bernoulli(1 − ``drop_prob``) keep draw.

    The paper's best setting is MRI in 70 % of training samples (drop 0.3); the official code drew one flag per
    batch with drop 0.4. Per-sample draws make the rate hold for any batch size.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"mri drop probability must be in [0, 1], got {drop_prob}")
    keep = torch.rand(available.shape, generator=generator, device=available.device) >= drop_prob
    return available.float() * keep.float()


class DiffusionPrepareBatch(PrepareBatch):
    """Training batches for a conditional diffusion network (or a plain regressor).

    For each sample: t ~ U{0..T−1}, ε ~ N(0, I), x_t = q_sample(sd_pet, t, ε), MRI flag = availability ×
    keep-draw (``mri_drop_prob``), MRI zeroed where the flag is 0. Returns
    ``(x_t, targets, (), {"t", "ld", "mri", "mri_available"})`` so ``SupervisedTrainer`` calls
    ``network(x_t, t=t, ld=ld, mri=mri, mri_available=flag)`` (t mapped by ``diffusion.model_timesteps``: the
    original 0..T−1 steps); ``targets`` is the dict the loss module needs (x_start, x_t, t, noise, flag).

    A network with ``is_diffusion = False`` (MFdiff's no-diffusion ablation rows) gets ``x_t = t = None`` and
    ``targets["x_t"] = None``: the loss is then plain MSE to SD.
    """

    def __init__(
        self,
        diffusion: Any,
        mri_drop_prob: float = 0.3,
        network: torch.nn.Module | None = None,
        channels_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= mri_drop_prob <= 1.0:
            raise ValueError(f"mri_drop_prob must be in [0, 1], got {mri_drop_prob}")
        self.diffusion = diffusion
        self.mri_drop_prob = float(mri_drop_prob)
        module = getattr(network, "module", network)
        self.is_diffusion = bool(getattr(module, "is_diffusion", True))
        self.channels_last = channels_last
        self.generator = generator

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor | None, dict[str, Any], tuple, dict[str, Any]]:
        cl = self.channels_last
        sd = _to(batchdata["sd_pet"], device, non_blocking, cl).float()
        ld = _to(batchdata["ld_pet"], device, non_blocking, cl).float()
        mri = _to(batchdata["mri"], device, non_blocking, cl).float()
        available = batchdata["mri_available"]
        available = torch.as_tensor(available, dtype=torch.float32).to(device=sd.device).reshape(sd.shape[0])
        flag = mri_dropout_flags(available, self.mri_drop_prob)
        mri = mri * flag.view(-1, 1, 1, 1).to(mri.dtype)
        targets: dict[str, Any] = {"x_start": sd, "mri_available": flag}
        if not self.is_diffusion:
            targets.update(x_t=None, t=None, noise=None)
            return None, targets, (), {"t": None, "ld": ld, "mri": mri, "mri_available": flag}
        t = self.diffusion.sample_timesteps(sd.shape[0], device=sd.device, generator=self.generator)
        noise = torch.randn(sd.shape, device=sd.device, dtype=sd.dtype, generator=self.generator)
        if cl:
            noise = noise.contiguous(memory_format=torch.channels_last)
        x_t = self.diffusion.q_sample(sd, t, noise)
        targets.update(x_t=x_t, t=t, noise=noise)
        net_t = self.diffusion.model_timesteps(t) if hasattr(self.diffusion, "model_timesteps") else t
        return x_t, targets, (), {"t": net_t, "ld": ld, "mri": mri, "mri_available": flag}


class ValidationPrepareBatch(PrepareBatch):
    """Validation batches: ``(ld, sd, (), {"mri", "mri_available"})`` for ``DiffusionSamplerInferer``, with the
    data's own MRI availability (no dropout). ``ld`` is the engine's "image", so the LD input's PSNR/SSIM to
    SD can be logged beside the prediction's as the reference to beat."""

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, Any]]:
        ld = batchdata["ld_pet"].to(device=device, non_blocking=non_blocking).float()
        sd = batchdata["sd_pet"].to(device=device, non_blocking=non_blocking).float()
        available = torch.as_tensor(batchdata["mri_available"], dtype=torch.float32).to(ld.device).reshape(-1)
        mri = batchdata["mri"].to(device=device, non_blocking=non_blocking).float() * available.view(-1, 1, 1, 1)
        return ld, sd, (), {"mri": mri, "mri_available": available}
