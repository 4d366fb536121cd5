"""The tiny networks the tests build: one definition of each, so a change of the config format is made once.

Every config here is small enough to run a forward pass on one CPU thread in milliseconds: two UNet levels of
32/64 channels with one ResBlock each. ``attention=True`` adds two-head self-attention at the second level (and
two heads in MFdiff's Restormer blocks), for tests of the attention paths; otherwise there is none.

Known-answer stand-ins, registered with the network factory on import (so they travel through real checkpoints):
``inference_test_identity`` is a regressor (``is_diffusion = False``) returning the LD PET, and
``inference_test_oracle`` a diffusion network whose x̂0 prediction is the LD PET (DDIM with η = 0 ends exactly on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from m2diff_monai.checkpoint import new_checkpoint, write_checkpoint
from m2diff_monai.engines.workflow import checkpoint_config
from m2diff_monai.networks.factory import register_network

TINY_SIZE = 16


def tiny_unet(image_size: int = TINY_SIZE, attention: bool = False, **overrides: Any) -> dict[str, Any]:
    """The IDDPM UNet keys (M2Diff's top level, MFdiff's ``unet`` block)."""
    unet: dict[str, Any] = {
        "model_channels": 32,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [image_size // 2] if attention else [],
        "num_heads": 2 if attention else 1,
        "dropout": 0.0,
    }
    return {**unet, **overrides}


def tiny_m2diff(
    image_size: int = TINY_SIZE, variant: str = "V6", attention: bool = False, **overrides: Any
) -> dict[str, Any]:
    """A ``build_network`` config of M2Diff ``variant`` (keys given in ``overrides`` win, e.g. ``channel_mult``)."""
    return {
        "name": "m2diff",
        "preset": "demo",
        "variant": variant,
        "image_size": image_size,
        **tiny_unet(image_size, attention),
        **overrides,
    }


def tiny_fusion(heads: int = 1, **overrides: Any) -> dict[str, Any]:
    """MFdiff's fusion module (Restormer + INN) at width 8, one block each."""
    return {"dim": 8, "num_blocks": 1, "heads": heads, "decoder_blocks": 1, **overrides}


def tiny_mfdiff(
    image_size: int = TINY_SIZE,
    variant: str = "MFdiff",
    attention: bool = False,
    allow_missing_mri: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """A ``build_network`` config of MFdiff ``variant``."""
    return {
        "name": "mfdiff",
        "preset": "demo",
        "variant": variant,
        "image_size": image_size,
        "allow_missing_mri": allow_missing_mri,
        "fusion": tiny_fusion(heads=2 if attention else 1),
        "unet": tiny_unet(image_size, attention),
        **overrides,
    }


def save_checkpoint(
    path: Path,
    network: torch.nn.Module,
    diffusion: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    inference_defaults: dict[str, Any] | None = None,
    *,
    ema_state: dict[str, torch.Tensor] | None = None,
    epoch: int = 1,
    iteration: int = 1,
) -> Path:
    """``network`` saved as training saves it (:func:`m2diff_monai.checkpoint.new_checkpoint`, config by
    ``checkpoint_config``; diffusion ``{"timesteps": 100}`` unless given; raw weights, EMA only when given)."""
    config = checkpoint_config(
        network, {"timesteps": 100} if diffusion is None else diffusion, data, inference_defaults
    )
    checkpoint = new_checkpoint(
        network.state_dict(), config, ema_state=ema_state, optimizer={}, epoch=epoch, iteration=iteration
    )
    return write_checkpoint(path, checkpoint)


def randomize_zero_params(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every all-zero parameter small random weights (0.05·N(0, 1)), in place; returns ``net``.

    IDDPM zero-initialises its output convolutions: at init every output is 0 and no gradient reaches the layers
    above, so tests of outputs and gradients need them non-zero.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().any():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return net


class IdentityRegressor(torch.nn.Module):
    """Returns the LD PET: a 'model' whose exact answer is known. Records how it was called."""

    is_diffusion = False

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)
        self.calls: list[dict] = []

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None):
        self.calls.append({"mri": None if mri is None else tuple(mri.shape), "x_t": x_t is None})
        return {"out": ld.clone()}


class OracleDenoiser(IdentityRegressor):
    """Diffusion network predicting x̂0 = LD whatever x_t and t are."""

    is_diffusion = True

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None):
        assert x_t is not None and t is not None and t.dtype == torch.long
        self.calls.append({"mri": None if mri is None else tuple(mri.shape), "t": int(t.max())})
        return {"out": ld.clone()}


register_network("inference_test_identity", IdentityRegressor)
register_network("inference_test_oracle", OracleDenoiser)
