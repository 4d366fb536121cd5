"""``prepare_batch`` callables for MONAI engines: manifest batches → (inputs, targets, args, kwargs).

MONAI's own ``DiffusionPrepareBatch`` cannot be used: it draws timesteps from a MONAI scheduler, passes the
condition by concatenation or ``context`` and returns ε as the target. These networks take ``ld``, ``mri`` and
``mri_available`` as keyword conditions and the loss needs x_0, x_t, t and the noise.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import PrepareBatch

from m2diff_monai.diffusion import check_max_timestep
from m2diff_monai.engines.losses import BIAS_LOSSES

# What MRI dropout does (see ``DiffusionPrepareBatch``): "official" = the official code's mri_flag, which only
# switches what the PET decoder concatenates; "zero_and_mask" = this project's earlier rule (zero the T1 and
# leave L_mri and L_bias out for the dropped samples).
MRI_DROPOUT_MODES = ("official", "zero_and_mask")


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

    For each sample: t ~ U{0..T−1} (U{0..max_timestep} when given: for a model sampled only from a truncated
    start, not in the papers), ε ~ N(0, I), x_t = q_sample(sd_pet, t, ε), MRI flag = availability ×
    keep-draw (``mri_drop_prob``). Returns ``(x_t, targets, (), {"t", "ld", "mri", "mri_available"})`` so
    ``SupervisedTrainer`` calls ``network(x_t, t=t, ld=ld, mri=mri, mri_available=flag)`` (t mapped by
    ``diffusion.model_timesteps``: the original 0..T−1 steps); ``targets`` is the dict the loss module needs
    (x_start, x_t, t, noise, the flag as ``mri_available`` and the L_mri/L_bias mask as ``mri_supervised``).

    ``mri_dropout`` says what a dropped sample (flag 0) is:

    - ``"official"`` (the official code's ``mri_flag``): the flag only switches the PET decoder's MRI skips to
      its own PET skips (the network honours the flag). The MRI encoder and decoder still get the real T1, and
      L_mri and L_bias are still trained on dropped samples: ``mri_supervised`` = the data's MRI availability.
    - ``"zero_and_mask"``: the T1 of dropped samples is zeroed and their L_mri and L_bias are left out
      (``mri_supervised`` = the flag). Not the official method; kept for comparison.

    ``bias_loss="official_xprev"`` adds the official L_bias's second forward pass: for each sample a second
    x_t' = q_sample(sd_pet, t, ε') with the SAME t and a fresh ε' (the official loop draws its second x_t with
    ``q_sample(SD, t)`` at the step's t), plus the one noise draw z that ``p_sample`` shares between both
    branches (``targets["bias_x_t"]``, ``targets["bias_step_noise"]``). Both passes go through the network as
    one batch of 2B (x_t first, then x_t'; conditions repeated), so autocast, DDP and gradients treat them as
    one forward; every layer is per-sample (GroupNorm, no BatchNorm), so this equals two separate passes. It
    doubles the forward/backward cost and activation memory of a step. Only networks with an MRI decoder
    (``branches`` containing "mri") get it; with ``network=None`` it is always added.

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
        mri_dropout: str = "official",
        bias_loss: str = "official_xprev",
        max_timestep: int | None = None,
    ) -> None:
        if not 0.0 <= mri_drop_prob <= 1.0:
            raise ValueError(f"mri_drop_prob must be in [0, 1], got {mri_drop_prob}")
        if mri_dropout not in MRI_DROPOUT_MODES:
            raise ValueError(f"mri_dropout must be one of {MRI_DROPOUT_MODES}, got {mri_dropout!r}")
        if bias_loss not in BIAS_LOSSES:
            raise ValueError(f"bias_loss must be one of {BIAS_LOSSES}, got {bias_loss!r}")
        self.diffusion = diffusion
        self.mri_drop_prob = float(mri_drop_prob)
        self.mri_dropout = mri_dropout
        module = getattr(network, "module", network)
        self.is_diffusion = bool(getattr(module, "is_diffusion", True))
        two_branch = module is None or "mri" in tuple(getattr(module, "branches", ()))
        self.bias_pass = bias_loss == "official_xprev" and two_branch and self.is_diffusion
        self.channels_last = channels_last
        self.generator = generator
        self.max_timestep = max_timestep
        if max_timestep is not None:
            self.max_timestep = check_max_timestep(max_timestep, diffusion.num_timesteps)

    def _noise_like(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=self.generator)
        return noise.contiguous(memory_format=torch.channels_last) if self.channels_last else noise

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
        if self.mri_dropout == "zero_and_mask":
            mri = mri * flag.view(-1, 1, 1, 1).to(mri.dtype)
            supervised = flag
        else:
            # No T1 in the data: the manifest's MRI is zeros already; nothing to supervise the MRI branch with.
            supervised = available
        targets: dict[str, Any] = {"x_start": sd, "mri_available": flag, "mri_supervised": supervised}
        if not self.is_diffusion:
            targets.update(x_t=None, t=None, noise=None)
            return None, targets, (), {"t": None, "ld": ld, "mri": mri, "mri_available": flag}
        t = self.diffusion.sample_timesteps(
            sd.shape[0], device=sd.device, generator=self.generator, max_timestep=self.max_timestep
        )
        noise = self._noise_like(sd)
        x_t = self.diffusion.q_sample(sd, t, noise)
        targets.update(x_t=x_t, t=t, noise=noise)
        inputs, net_t, net_ld, net_mri, net_flag = x_t, t, ld, mri, flag
        if self.bias_pass:
            bias_x_t = self.diffusion.q_sample(sd, t, self._noise_like(sd))
            targets.update(bias_x_t=bias_x_t, bias_step_noise=self._noise_like(sd))
            inputs = torch.cat([x_t, bias_x_t])
            net_t, net_ld, net_mri, net_flag = (torch.cat([v, v]) for v in (t, ld, mri, flag))
            if cl:
                inputs, net_ld, net_mri = (
                    v.contiguous(memory_format=torch.channels_last) for v in (inputs, net_ld, net_mri)
                )
        if hasattr(self.diffusion, "model_timesteps"):
            net_t = self.diffusion.model_timesteps(net_t)
        return inputs, targets, (), {"t": net_t, "ld": net_ld, "mri": net_mri, "mri_available": net_flag}


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
