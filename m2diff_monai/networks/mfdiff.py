"""The MFdiff network (paper Sec. 3.2) and its Table 5 ablation rows, as configurations of one class.

MFdiff = multi-modality fusion module (``mfdiff_fusion.MFdiffFusion``) + a conditional DDPM ε-UNet (the paper's
"denoising attention UNet"): ε̂ = UNet(cat[x_t, x_P, F], t), where x_P is the LD PET and F the fusion feature.
The UNet is the project's one IDDPM UNet (``m2diff.IDDPMUNet``, conditions concatenated to x_t). The fusion
module trains jointly with the UNet under the diffusion loss (paper Eq. 9 is the only loss; there is no
separate fusion loss and no pre-training of the fusion module).

Ablation rows (``variant``), paper Table 5:

========  ========================  ==================  =========  ====================================
variant   UNet input                fusion branches     diffusion  output ``out``
========  ========================  ==================  =========  ====================================
UNet      LD                        —                   no         SD prediction (direct regression)
MUNet     cat[LD, MRI]              —                   no         SD prediction
GMUNet    cat[LD, F]                (global, global)    no         SD prediction
DMUNet    cat[LD, F]                (detail, detail)    no         SD prediction
CMUNet    cat[LD, F]                (global, detail)    no         SD prediction
MFdiff    cat[x_t, LD, F]           (global, detail)    yes        ε̂ (and the variance channel if learned)
========  ========================  ==================  =========  ====================================

Calling convention (one engine drives M2Diff and MFdiff): ``net(x_t, t, ld=..., mri=..., mri_available=...)``.
Rows with ``is_diffusion == False`` ignore ``x_t`` and ``t`` (pass ``None``): ``net(ld=..., mri=...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .factory import register_network
from .m2diff import IDDPMUNet, resolve_mri_available
from .mfdiff_fusion import MFdiffFusion

VARIANTS = ("UNet", "MUNet", "GMUNet", "DMUNet", "CMUNet", "MFdiff")
# Assumption (paper Sec. 5.3): GMUNet/DMUNet keep two branch slots to match the parameter count — "GMUNet
# replaces the detail feature extraction branch with a global feature extraction branch", and vice versa.
VARIANT_BRANCHES = {
    "GMUNet": ("global", "global"),
    "DMUNet": ("detail", "detail"),
    "CMUNet": ("global", "detail"),
    "MFdiff": ("global", "detail"),
}

_PAPER_FUSION: dict[str, Any] = {
    # CDDFuse defaults (facts §2) where the paper is silent.
    "dim": 64,
    "num_blocks": 4,
    "heads": 8,
    "ffn_expansion": 2.0,
    "bias": False,
    # Assumption: CDDFuse's LayerNorm kind ("WithBias"); "bias_free" is Restormer's other kind.
    "layer_norm": "with_bias",
    # Assumption: CDDFuse's channel (C×C) attention in the global branch; the paper's text says "spatial".
    "global_attention": "channel",
    "global_ffn_expansion": 1.0,
    "inn_layers": 3,  # paper: three affine coupling layers
    "coupling": "paper",
    "fusion_inn_layers": 1,  # Assumption: CDDFuse's detail fusion layer has one coupling
    "decoder_blocks": 2,  # paper: "the decoder network, which includes two Transformer blocks"
    # Assumption: F is one image-like channel (CDDFuse's fused image; "x_fusion" is concatenated to x_t and x_P
    # like an image). The paper's notation F ∈ R^{C×H×W} also reads as C_f = dim: set out_channels = dim.
    "out_channels": 1,
    # Assumption: no sigmoid (CDDFuse squashes its fused image to [0, 1]; here F is a learned condition).
    "output_activation": "none",
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper-192": {
        "name": "mfdiff",
        "variant": "MFdiff",
        "image_size": 192,
        "allow_missing_mri": False,
        "fusion": dict(_PAPER_FUSION),
        # Assumption: "the same hyperparameters as [39]" (DDPM): its 256² layout, 128 channels, mult
        # (1,1,2,2,4,4), 2 ResBlocks per level, single-head attention at the ds=16 level (12×12 at 192²);
        # dropout 0.1 (DDPM's small-dataset setting); fixed variance (ε-MSE, Eq. 9), no learned sigma.
        "unet": {
            "model_channels": 128,
            "channel_mult": [1, 1, 2, 2, 4, 4],
            "num_res_blocks": 2,
            "attention_resolutions": [12],
            "num_heads": 1,
            "dropout": 0.1,
            "learn_sigma": False,
        },
    },
    "demo": {
        "name": "mfdiff",
        "variant": "MFdiff",
        "image_size": 64,
        "allow_missing_mri": False,
        "fusion": {
            **_PAPER_FUSION,
            "dim": 16,
            "num_blocks": 1,
            "heads": 2,
            "decoder_blocks": 1,
        },
        "unet": {
            "model_channels": 32,
            "channel_mult": [1, 2, 2, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [16],
            "num_heads": 2,
            "dropout": 0.0,
            "learn_sigma": False,
        },
    },
}

_TOP_LEVEL_KEYS = {"name", "preset", "variant", "image_size", "allow_missing_mri", "fusion", "unet"}


def resolve_mfdiff_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Full MFdiff config: the preset (``config["preset"]``, default ``"paper-192"``) updated by ``config``.

    ``fusion`` and ``unet`` are merged key by key, so ``{"preset": "demo", "unet": {"dropout": 0.1}}`` changes
    one value. The result is what checkpoints store, so a network rebuilds without knowing the preset table.
    """
    unknown = set(config) - _TOP_LEVEL_KEYS
    if unknown:
        raise ValueError(f"unknown MFdiff config keys {sorted(unknown)}; allowed: {sorted(_TOP_LEVEL_KEYS)}")
    preset = config.get("preset", "paper-192")
    if preset not in PRESETS:
        raise ValueError(f"unknown MFdiff preset {preset!r}; choose one of {sorted(PRESETS)}")
    resolved = copy.deepcopy(PRESETS[preset])
    resolved["preset"] = preset
    for key, value in config.items():
        if key in ("fusion", "unet"):
            resolved[key].update(copy.deepcopy(dict(value)))
        else:
            resolved[key] = copy.deepcopy(value)
    resolved["name"] = "mfdiff"
    return resolved


class MFdiffNet(nn.Module):
    """MFdiff and its ablation rows. ``forward(x_t, t, ld, mri=None, mri_available=None) -> dict``.

    Returns ``{"out": ..., "pet": ..., "fusion": F}`` (``pet`` is ``out`` under M2Diff's branch name;
    ``fusion`` only for the rows with the fusion module). ``out`` is ε̂ (B, 1 or 2, H, W) for ``MFdiff`` and the
    SD PET prediction (B, 1, H, W) for the others.

    Attributes the engine reads: ``is_diffusion`` (False: train with a direct regression loss on ``out``
    and call without ``x_t``/``t``), ``uses_mri``, ``learn_sigma``, ``out_channels``, ``config``.

    Missing MRI: with ``allow_missing_mri=False`` (default) a call without ``mri``, or with an
    ``mri_available`` flag of 0, raises ``ValueError``. With ``True``, a missing ``mri`` is replaced by zeros
    and flagged unavailable; the per-sample flag zeroes that sample's MRI input and its MRI encoder features
    (global and detail) before the cross-modality sum, so F is computed from the PET features alone.
    """

    branches = ("pet",)

    def __init__(
        self,
        variant: str = "MFdiff",
        image_size: int = 192,
        fusion: Mapping[str, Any] | None = None,
        unet: Mapping[str, Any] | None = None,
        allow_missing_mri: bool = False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown MFdiff variant {variant!r}; choose one of {VARIANTS}")
        fusion_cfg = {**_PAPER_FUSION, **dict(fusion or {})}
        if "branches" in fusion_cfg:
            raise ValueError("fusion branches follow from the variant (GMUNet, DMUNet, CMUNet); do not set them")
        unet_cfg = {**PRESETS["paper-192"]["unet"], **dict(unet or {})}
        for key in ("channel_mult", "attention_resolutions"):
            unet_cfg[key] = [int(v) for v in unet_cfg[key]]
        self.learn_sigma = bool(unet_cfg.pop("learn_sigma"))
        self.variant = variant
        self.image_size = image_size
        self.is_diffusion = variant == "MFdiff"
        if self.learn_sigma and not self.is_diffusion:
            raise ValueError(f"learn_sigma applies to the diffusion row only, not to {variant}")
        self.uses_mri = variant != "UNet"
        self.allow_missing_mri = allow_missing_mri
        self.out_channels = 2 if self.learn_sigma else 1
        self.config = {
            "name": "mfdiff",
            "variant": variant,
            "image_size": image_size,
            "allow_missing_mri": allow_missing_mri,
            "fusion": dict(fusion_cfg),
            "unet": {**unet_cfg, "learn_sigma": self.learn_sigma},
        }

        self.fusion: MFdiffFusion | None = None
        if variant in VARIANT_BRANCHES:
            self.fusion = MFdiffFusion(in_channels=1, branches=VARIANT_BRANCHES[variant], **fusion_cfg)
            cond_channels = 1 + self.fusion.out_channels  # LD + F (for MFdiff: cat[x_t, LD, F])
        elif variant == "MUNet":
            cond_channels = 1  # MRI, concatenated to the LD input: the "naive fusion"
        else:
            cond_channels = 0
        # Assumption: the regression rows use the same IDDPM UNet, fed LD (plus conditions) in x_t's place and a
        # constant t = 0 (its time embedding becomes a learned bias), so Table 5's last row isolates diffusion.
        if not self.is_diffusion and self.fusion is not None:
            cond_channels -= 1  # regression rows: x := LD, cond := F
        self.unet = IDDPMUNet(
            in_channels=1,
            out_channels=self.out_channels,
            image_size=image_size,
            use_scale_shift_norm=True,
            cond_channels=cond_channels,
            **unet_cfg,
        )

    def _mri_and_flag(
        self, ld: torch.Tensor, mri: torch.Tensor | None, mri_available: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MRI to use and the per-sample availability mask (None: all available, no masking needed)."""
        if mri is None and not self.allow_missing_mri:
            raise ValueError(
                f"MFdiff variant {self.variant} needs an MRI (mri=...); build it with "
                "allow_missing_mri=True to run MRI-free"
            )
        if mri is not None and mri.shape != ld.shape:
            raise ValueError(f"mri shape {tuple(mri.shape)} differs from ld shape {tuple(ld.shape)}")
        if mri is not None and mri_available is None:
            return mri, None
        available = resolve_mri_available(mri, mri_available, ld.shape[0], ld.device)
        if not self.allow_missing_mri and not bool(available.all()):
            raise ValueError(
                f"mri_available marks samples without MRI but MFdiff variant {self.variant} was built with "
                "allow_missing_mri=False"
            )
        flag = available.to(ld.dtype)
        if mri is None:
            if mri_available is not None and bool(available.any()):
                raise ValueError("mri_available says MRI is present but mri is None")
            return torch.zeros_like(ld), flag
        return mri * flag.reshape(-1, 1, 1, 1), flag

    def forward(
        self,
        x_t: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        ld: torch.Tensor | None = None,
        mri: torch.Tensor | None = None,
        mri_available: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if ld is None:
            raise ValueError("MFdiffNet needs the LD PET: net(x_t, t, ld=..., mri=...)")
        if self.is_diffusion and (x_t is None or t is None):
            raise ValueError("the MFdiff diffusion row needs x_t and t: net(x_t, t, ld=..., mri=...)")
        result: dict[str, torch.Tensor] = {}
        cond: torch.Tensor | None = None
        if self.uses_mri:
            mri, flag = self._mri_and_flag(ld, mri, mri_available)
            if self.fusion is not None:
                fusion = self.fusion(ld, mri, flag)
                result["fusion"] = fusion
                cond = torch.cat((ld, fusion), dim=1) if self.is_diffusion else fusion
            else:
                cond = mri
        if self.is_diffusion:
            out = self.unet(x_t, t, cond=cond)["out"]
        else:
            t0 = torch.zeros(ld.shape[0], dtype=torch.long, device=ld.device)
            out = self.unet(ld, t0, cond=cond)["out"]
        result["out"] = out
        result["pet"] = out  # alias: the engine's per-branch loss reads net.branches, as for M2Diff's V1/V2
        return result


def build_mfdiff(config: Mapping[str, Any]) -> MFdiffNet:
    """Factory builder: ``build_network({"name": "mfdiff", "preset": "demo", "variant": "CMUNet", ...})``."""
    full = resolve_mfdiff_config(config)
    net = MFdiffNet(
        variant=full["variant"],
        image_size=full["image_size"],
        fusion=full["fusion"],
        unet=full["unet"],
        allow_missing_mri=full["allow_missing_mri"],
    )
    net.config = {"preset": full["preset"], **net.config}
    return net


register_network("mfdiff", build_mfdiff)
