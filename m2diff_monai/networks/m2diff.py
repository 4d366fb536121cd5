"""The M2Diff network (dual-encoder, dual-decoder IDDPM UNet with hierarchical feature fusion) and its ablations.

Layout reproduces the official ``BiTaskUNetModel`` (facts §1), checked by parameter count (268,986,114 here;
268,987,523 in the official code, whose extra 1,409 are an inherited IDDPM output head that its forward never
uses and that is left out here):

* one timestep embedding sinusoidal(mc) → Linear(mc→4mc) → SiLU → Linear(4mc→4mc), shared by every path;
* PET encoder on ``cat[x_t, LD]`` with attention at ``attention_resolutions`` and a ResBlock–Attention–ResBlock
  middle; MRI encoder on ``cat[T1, x_t]`` without attention and with a single-ResBlock middle (``mri_attention``);
* hierarchical feature fusion (HFF) at every decoder block: the PET decoder block sees
  ``cat[h_pet, skip_pet, skip_mri]``, the MRI decoder block ``cat[h_mri, skip_mri, skip_pet]``; no bottleneck fusion;
* each branch ends in a plain Conv2d(mc→out, 3×3) (no norm/SiLU before it, default init, as in the official code).

Ablation rows of the paper's Table IV are configurations of the same code (``build_m2diff_variant``):

====  =============================================================  ==========================================
V1    single task, input ``cat[x_t, LD]`` (the IDDPM baseline)        ``SingleTaskUNet(use_mri=False)``
V2    single task, input ``cat[x_t, LD, T1]``                         ``SingleTaskUNet(use_mri=True)``
V3    two encoders and two decoders, no HFF                          ``M2DiffUNet(hff=False)``
V4    two encoders, one (PET) decoder with HFF                       ``M2DiffUNet(mri_decoder=False)``
V5    M2Diff with asymmetric decoders (different MRI dropout)        ``M2DiffUNet(mri_dropout=...)``
V6    M2Diff                                                         ``M2DiffUNet()``
====  =============================================================  ==========================================

Assumptions (not fixed by the paper or the facts gathered from the official code):

* the branch heads use PyTorch's default Conv2d init (the official code's heads are plain ``nn.Conv2d``);
* V4 keeps the PET decoder and drops the MRI decoder, MRI middle block and MRI head (they would be unused);
* V5 varies dropout in the MRI *decoder* only ("Asym. Decoders"), default ``V5_DEFAULT_MRI_DROPOUT``;
* for MRI-free samples the MRI decoder still receives the real PET skips (its output is not supervised);
* ``output_mode="mean"`` with a learned variance averages both output channels.

Every variant has ``forward(x_t, t, ld, mri=None, mri_available=None) -> dict`` with ``"out"`` (what the sampler
uses), ``"pet"`` and, for two-decoder variants when MRI is given, ``"mri"``; ``net.branches`` names the outputs the
loss supervises. Random MRI dropout during training is the engine's job; the network only honours the flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .blocks import (
    TimestepEmbedding,
    UNetDecoder,
    UNetEncoder,
    attention_downsample_factors,
    middle_block,
    normalization,
    zero_module,
)

__all__ = [
    "VARIANTS",
    "OUTPUT_MODES",
    "IDDPMUNet",
    "SingleTaskUNet",
    "M2DiffUNet",
    "build_m2diff_variant",
    "resolve_mri_available",
]

VARIANTS = ("V1", "V2", "V3", "V4", "V5", "V6")
OUTPUT_MODES = ("pet", "mean")
# Assumption: the paper does not give V5's MRI-decoder dropout; with the paper's 0.2 elsewhere, V5 defaults to none.
V5_DEFAULT_MRI_DROPOUT = 0.0


def resolve_mri_available(
    mri: torch.Tensor | None, mri_available: torch.Tensor | None, batch_size: int, device: torch.device
) -> torch.Tensor:
    """Per-sample MRI availability as a bool (B,) tensor.

    ``None`` means "all available" when ``mri`` is given and "none available" when it is not. Accepts float 0/1,
    int or bool flags. The engine uses the same rule to mask the MRI branch's loss.
    """
    if mri_available is None:
        return torch.full((batch_size,), mri is not None, dtype=torch.bool, device=device)
    flags = torch.as_tensor(mri_available, device=device).reshape(-1)
    if flags.numel() != batch_size:
        raise ValueError(f"mri_available has {flags.numel()} entries for a batch of {batch_size}")
    return flags > 0.5 if flags.dtype != torch.bool else flags


def _check_spatial(x: torch.Tensor, levels: int, name: str = "x_t") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(x.shape)}")
    factor = 2 ** (levels - 1)
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"{name} spatial size {tuple(x.shape[-2:])} must be divisible by {factor}")


class IDDPMUNet(nn.Module):
    """IDDPM's UNet (``UNetModel``) with optional conditioning channels concatenated to the input.

    ``in_channels`` are the diffused image's channels, ``cond_channels`` the extra channels of ``cond`` (LD PET,
    MRI, ...); the first conv sees ``cat[x_t, cond]``. The output head is IDDPM's norm → SiLU → zero-init conv3×3.
    ``attention_resolutions`` are feature-map sizes at ``image_size`` (IDDPM: ds = image_size // res).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.0,
        image_size: int = 256,
        use_scale_shift_norm: bool = True,
        cond_channels: int = 0,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.cond_channels = cond_channels
        self.out_channels = out_channels
        self.levels = len(channel_mult)
        attention_ds = attention_downsample_factors(image_size, attention_resolutions)
        emb_ch = 4 * model_channels
        common = dict(
            num_res_blocks=num_res_blocks,
            attention_ds=attention_ds,
            num_heads=num_heads,
            dropout=dropout,
            emb_channels=emb_ch,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            conv_resample=conv_resample,
            use_checkpoint=use_checkpoint,
        )
        self.time_embed = TimestepEmbedding(model_channels)
        self.encoder = UNetEncoder(in_channels + cond_channels, model_channels, channel_mult, **common)
        ch = self.encoder.out_channels
        self.middle = middle_block(ch, emb_ch, dropout, num_heads, True, use_scale_shift_norm)
        self.decoder = UNetDecoder(
            ch, self.encoder.skip_channels, model_channels, channel_mult, start_ds=self.encoder.out_ds, **common
        )
        self.out = nn.Sequential(
            normalization(self.decoder.out_channels),
            nn.SiLU(),
            zero_module(nn.Conv2d(self.decoder.out_channels, out_channels, 3, padding=1)),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        _check_spatial(x_t, self.levels)
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels:
                got = None if cond is None else cond.shape[1]
                raise ValueError(f"expected cond with {self.cond_channels} channels, got {got}")
            x_t = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this network was built with cond_channels=0 but got cond")
        emb = self.time_embed(t)
        h, skips = self.encoder(x_t, emb)
        h = self.middle(h, emb)
        h = self.decoder(h, emb, [(s,) for s in reversed(skips)])
        return {"out": self.out(h)}


class SingleTaskUNet(nn.Module):
    """Ablations V1/V2: one IDDPM UNet conditioned on LD PET (V1) or on LD PET and T1 by concatenation (V2).

    Same call as M2Diff so one engine drives every variant. V2 zeroes the T1 channel of samples without MRI.
    """

    branches = ("pet",)

    def __init__(self, use_mri: bool = False, **unet_kwargs: Any):
        super().__init__()
        self.use_mri = use_mri
        self.unet = IDDPMUNet(in_channels=1, cond_channels=2 if use_mri else 1, **unet_kwargs)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ld: torch.Tensor,
        mri: torch.Tensor | None = None,
        mri_available: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cond = ld
        if self.use_mri:
            avail = resolve_mri_available(mri, mri_available, x_t.shape[0], x_t.device)
            if mri is None:
                if mri_available is not None and bool(avail.any()):
                    raise ValueError("mri_available says MRI is present but mri is None")
                t1 = torch.zeros_like(ld)
            elif mri_available is None:
                t1 = mri
            else:
                t1 = torch.where(avail.reshape(-1, 1, 1, 1), mri, torch.zeros_like(mri))
            cond = torch.cat([ld, t1], dim=1)
        out = self.unet(x_t, t, cond)["out"]
        return {"pet": out, "out": out}


class M2DiffUNet(nn.Module):
    """M2Diff: PET and MRI encoder–decoder pairs sharing skips through HFF (V6); flags give V3–V5.

    Args beyond IDDPM's: ``learn_sigma`` (2 output channels per branch: mean-parameter, variance interpolation),
    ``output_mode`` ("pet": the PET branch as in the official code; "mean": Eq. 8 average of both branches),
    ``mri_attention`` (False = official asymmetric attention), ``hff`` (False = V3), ``mri_decoder`` (False = V4),
    ``mri_dropout`` (MRI decoder's dropout, None = ``dropout``; differing = V5).

    MRI-free samples (``mri_available`` 0): the PET decoder's MRI skips are replaced by its own PET skips, per
    sample (the official code's ``mri_flag``), so the PET output does not depend on the MRI input; the MRI
    encoder and decoder still run on whatever ``mri`` holds. With the official training dropout that is the real
    T1 and the MRI branch stays supervised; for samples with no T1 at all its output must be excluded from the
    loss (``DiffusionPrepareBatch``'s ``mri_supervised``). With
    ``output_mode="mean"`` such samples take the PET branch alone. ``mri=None`` skips the MRI path altogether
    (inference without MRI, same PET output as all flags 0); training should always pass ``mri`` (zeros where
    missing) so that every parameter stays in the graph (DDP).

    ``for_sampling()`` (called by ``checkpoint.load_model`` on every frozen network) stops decoding the MRI branch
    when nothing reads it: with ``output_mode="pet"`` its output only feeds the training loss, so a sampling pass
    skips the MRI decoder (output ``"out"`` unchanged, ``"mri"`` absent; ``benchmarks/bench_inference.py``).
    """

    decode_mri_branch: bool = True

    def __init__(
        self,
        image_size: int = 256,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.2,
        learn_sigma: bool = False,
        output_mode: str = "pet",
        use_scale_shift_norm: bool = True,
        mri_attention: bool = False,
        hff: bool = True,
        mri_decoder: bool = True,
        mri_dropout: float | None = None,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if output_mode == "mean" and not mri_decoder:
            raise ValueError('output_mode="mean" needs the MRI decoder')
        if not hff and not mri_decoder:
            raise ValueError("without HFF and without an MRI decoder the MRI encoder would be unused")
        self.output_mode = output_mode
        self.hff = hff
        self.has_mri_decoder = mri_decoder
        self.branches = ("pet", "mri") if mri_decoder else ("pet",)
        self.levels = len(channel_mult)
        out_channels = 2 if learn_sigma else 1
        attention_ds = attention_downsample_factors(image_size, attention_resolutions)
        mri_attention_ds = attention_ds if mri_attention else set()
        emb_ch = 4 * model_channels
        common = dict(
            num_res_blocks=num_res_blocks,
            num_heads=num_heads,
            emb_channels=emb_ch,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            conv_resample=conv_resample,
            use_checkpoint=use_checkpoint,
        )
        self.time_embed = TimestepEmbedding(model_channels)
        self.pet_encoder = UNetEncoder(
            2, model_channels, channel_mult, attention_ds=attention_ds, dropout=dropout, **common
        )
        self.mri_encoder = UNetEncoder(
            2, model_channels, channel_mult, attention_ds=mri_attention_ds, dropout=dropout, **common
        )
        ch, start_ds = self.pet_encoder.out_channels, self.pet_encoder.out_ds
        skips = self.pet_encoder.skip_channels
        fused_skips = [2 * s for s in skips] if hff else skips
        self.pet_middle = middle_block(ch, emb_ch, dropout, num_heads, True, use_scale_shift_norm)
        self.pet_decoder = UNetDecoder(
            ch,
            fused_skips,
            model_channels,
            channel_mult,
            attention_ds=attention_ds,
            dropout=dropout,
            start_ds=start_ds,
            **common,
        )
        self.pet_head = nn.Conv2d(model_channels, out_channels, 3, padding=1)
        if mri_decoder:
            dec_dropout = dropout if mri_dropout is None else mri_dropout
            self.mri_middle = middle_block(ch, emb_ch, dropout, num_heads, mri_attention, use_scale_shift_norm)
            self.mri_decoder = UNetDecoder(
                ch,
                fused_skips,
                model_channels,
                channel_mult,
                attention_ds=mri_attention_ds,
                dropout=dec_dropout,
                start_ds=start_ds,
                **common,
            )
            self.mri_head = nn.Conv2d(model_channels, out_channels, 3, padding=1)

    def for_sampling(self) -> M2DiffUNet:
        """Decode only what sampling reads (the MRI branch only for ``output_mode="mean"``); returns self."""
        self.decode_mri_branch = self.output_mode == "mean"
        return self

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        ld: torch.Tensor,
        mri: torch.Tensor | None = None,
        mri_available: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        _check_spatial(x_t, self.levels)
        batch = x_t.shape[0]
        if (
            mri is None
            and mri_available is not None
            and bool(resolve_mri_available(None, mri_available, batch, x_t.device).any())
        ):
            raise ValueError("mri_available says MRI is present but mri is None")
        # Statically known "all available" (mri given, no flags): no per-sample selection needed.
        avail = None
        if mri is not None and mri_available is not None:
            avail = resolve_mri_available(mri, mri_available, batch, x_t.device)

        emb = self.time_embed(t)
        h_pet, skips_pet = self.pet_encoder(torch.cat([x_t, ld], dim=1), emb)
        h_pet = self.pet_middle(h_pet, emb)
        if mri is not None:
            h_mri, skips_mri = self.mri_encoder(torch.cat([mri.to(x_t.dtype), x_t], dim=1), emb)

        if not self.hff:
            pet_groups = [(sp,) for sp in reversed(skips_pet)]
        elif mri is None:
            pet_groups = [(sp, sp) for sp in reversed(skips_pet)]
        elif avail is None:
            pet_groups = [(sp, sm) for sp, sm in zip(reversed(skips_pet), reversed(skips_mri), strict=True)]
        else:
            keep = avail.reshape(-1, 1, 1, 1)
            pet_groups = [
                (sp, torch.where(keep, sm, sp)) for sp, sm in zip(reversed(skips_pet), reversed(skips_mri), strict=True)
            ]
        pet = self.pet_head(self.pet_decoder(h_pet, emb, pet_groups))
        outputs = {"pet": pet, "out": pet}

        if self.has_mri_decoder and mri is not None and self.decode_mri_branch:
            h_mri = self.mri_middle(h_mri, emb)
            if self.hff:
                mri_groups = [(sm, sp) for sm, sp in zip(reversed(skips_mri), reversed(skips_pet), strict=True)]
            else:
                mri_groups = [(sm,) for sm in reversed(skips_mri)]
            mri_out = self.mri_head(self.mri_decoder(h_mri, emb, mri_groups))
            outputs["mri"] = mri_out
            if self.output_mode == "mean":
                mean = 0.5 * (pet + mri_out)
                outputs["out"] = mean if avail is None else torch.where(avail.reshape(-1, 1, 1, 1), mean, pet)
        return outputs


_UNET_KEYS = (
    "model_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "dropout",
    "image_size",
    "use_scale_shift_norm",
    "resblock_updown",
    "conv_resample",
    "use_checkpoint",
)


def build_m2diff_variant(variant: str = "V6", **config: Any) -> nn.Module:
    """Build an ablation row of the paper's Table IV from M2Diff keyword arguments.

    Keys that do not apply to a variant (``mri_attention``/``mri_dropout`` for V1/V2) are ignored; conflicting
    ones raise (``output_mode="mean"`` without an MRI decoder, V5 with ``mri_dropout == dropout``).
    """
    variant = str(variant).upper()
    if variant not in VARIANTS:
        raise ValueError(f"unknown M2Diff variant {variant!r}; expected one of {VARIANTS}")
    config = dict(config)
    if variant in ("V1", "V2"):
        if config.get("output_mode", "pet") != "pet":
            raise ValueError(f'{variant} has a single branch: output_mode must be "pet"')
        unet = {k: config[k] for k in _UNET_KEYS if k in config}
        unet["out_channels"] = 2 if config.get("learn_sigma", False) else 1
        unet.setdefault("dropout", 0.2)
        return SingleTaskUNet(use_mri=variant == "V2", **unet)
    for key in ("hff", "mri_decoder"):
        config.pop(key, None)
    if variant == "V3":
        return M2DiffUNet(hff=False, **config)
    if variant == "V4":
        config.pop("mri_dropout", None)
        return M2DiffUNet(mri_decoder=False, **config)
    if variant == "V5":
        if config.get("mri_dropout") is None:
            config["mri_dropout"] = V5_DEFAULT_MRI_DROPOUT
        if config["mri_dropout"] == config.get("dropout", 0.2):
            raise ValueError("V5 (asymmetric decoders) needs mri_dropout different from dropout")
        return M2DiffUNet(**config)
    if config.get("mri_dropout") is not None and config["mri_dropout"] != config.get("dropout", 0.2):
        raise ValueError("V6 has symmetric decoders: mri_dropout must equal dropout (use V5 otherwise)")
    config["mri_dropout"] = None
    return M2DiffUNet(**config)
