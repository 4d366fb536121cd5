"""IDDPM UNet building blocks (Nichol & Dhariwal 2021, openai/improved-diffusion), shared by M2Diff and MFdiff.

Written here rather than taken from MONAI because MONAI's ``DiffusionModelUNet`` blocks have no dropout and no
scale-shift norm (facts §5), and the M2Diff layout needs encoders and decoders as separate pieces (two encoders,
skip fusion between decoders), which no library UNet exposes.

Layout conventions follow IDDPM so that parameter counts match the official code exactly:

* GroupNorm with 32 groups, computed in float32 and cast back (IDDPM's ``GroupNorm32``). Under bf16/fp16 autocast
  the convolutions run in low precision; the normalisation statistics stay in fp32, which costs one cast per norm
  and keeps the scale-shift modulation stable.
* ResBlock: norm → SiLU → conv3×3, timestep embedding → SiLU → Linear (2·C_out with scale-shift norm), norm
  (× (1 + scale) + shift) → SiLU → dropout → zero-initialised conv3×3, skip = identity or 1×1 conv.
* AttentionBlock: norm → qkv Conv1d(C, 3C, 1) → multi-head attention → zero-initialised proj Conv1d(C, C, 1),
  residual. The qkv channel layout is IDDPM's (heads outermost, then q/k/v, then head channels), so IDDPM weights
  load as is; the attention itself runs through ``scaled_dot_product_attention`` (fused kernels, no N×N matrix
  materialised on CUDA) on a token layout that is free for ``channels_last`` inputs.
* Down/Upsample: strided conv3×3 / nearest ×2 then conv3×3 ("conv_resample").

Every reshape is a ``reshape`` (never ``view``), so ``channels_last`` tensors work throughout.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "GroupNorm32",
    "normalization",
    "zero_module",
    "timestep_embedding",
    "TimestepEmbedding",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "attention_downsample_factors",
    "UNetEncoder",
    "UNetDecoder",
    "middle_block",
]

NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 whatever the input dtype (IDDPM's choice, kept under autocast)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        no_autocast = (
            torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
        )
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with no_autocast:
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """IDDPM's normalisation layer: 32-group GroupNorm (``channels`` must be a multiple of 32)."""
    if channels % NORM_GROUPS:
        raise ValueError(f"GroupNorm needs channels divisible by {NORM_GROUPS}, got {channels}")
    return GroupNorm32(NORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so that a residual branch starts as the identity (IDDPM)."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, IDDPM's layout ``[cos | sin]``.

    t: (B,) timesteps in the original 0..T−1 range. Returns (B, dim) float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """sinusoidal(model_channels) → Linear(mc → 4mc) → SiLU → Linear(4mc → 4mc), IDDPM's ``time_embed``."""

    def __init__(self, model_channels: int, embed_dim: int | None = None):
        super().__init__()
        self.model_channels = model_channels
        self.embed_dim = embed_dim or 4 * model_channels
        self.mlp = nn.Sequential(
            nn.Linear(model_channels, self.embed_dim), nn.SiLU(), nn.Linear(self.embed_dim, self.embed_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.model_channels))


class TimestepBlock(nn.Module):
    """A block whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor: ...


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the timestep embedding to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    """Halve the spatial size: strided 3×3 conv (``use_conv``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour ×2, then a 3×3 conv when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None):
        super().__init__()
        self.out_channels = out_channels or channels
        if not use_conv and self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(TimestepBlock):
    """IDDPM residual block with timestep conditioning (scale-shift norm by default).

    ``up``/``down`` resample inside the block (guided-diffusion's ``resblock_updown``); the paper's configuration
    uses separate conv-resample layers instead, so both default to False.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = normalization(channels)
        self.in_conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        if up:
            self.resample: nn.Module | None = Upsample(channels, use_conv=False)
        elif down:
            self.resample = Downsample(channels, use_conv=False)
        else:
            self.resample = None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_norm = normalization(self.out_channels)
        self.dropout = nn.Dropout(p=dropout)
        self.out_conv = zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1))
        if self.out_channels == channels:
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        h = F.silu(self.in_norm(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.in_conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Spatial multi-head self-attention, IDDPM parameters, fused attention through SDPA."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} not divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        heads, head_ch = self.num_heads, c // self.num_heads
        # Tokens (B, N, C): a free view for channels_last input. The Conv1d(k=1) weights act as Linear layers.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, height * width, c)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        # IDDPM channel layout of qkv: [head][q|k|v][head_ch].
        qkv = qkv.reshape(b, height * width, heads, 3, head_ch).permute(3, 0, 2, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, heads, N, head_ch), scale 1/√head_ch
        attn = attn.transpose(1, 2).reshape(b, height * width, c)
        out = F.linear(attn, self.proj_out.weight[..., 0], self.proj_out.bias)
        out = out.reshape(b, height, width, c).permute(0, 3, 1, 2)
        if not x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous()
        return x + out


def attention_downsample_factors(image_size: int, attention_resolutions: Sequence[int]) -> set[int]:
    """IDDPM's convention: attention resolutions are feature-map sizes; the UNet keys them by ds = size // res."""
    factors = set()
    for res in attention_resolutions:
        if res <= 0 or image_size % int(res):
            raise ValueError(f"attention resolution {res} does not divide image_size {image_size}")
        factors.add(image_size // int(res))
    return factors


def _run(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, h, emb, use_reentrant=False)
    return block(h, emb)


class UNetEncoder(nn.Module):
    """IDDPM input blocks: conv3×3 stem, then per level ``num_res_blocks`` ResBlocks (+ attention) and a downsample.

    ``forward`` returns the deepest feature map and the list of skip features (one per block, the decoder's
    concatenation inputs, in order). ``skip_channels`` lists their channel counts.
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_ds: set[int],
        num_heads: int,
        dropout: float,
        emb_channels: int,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        self.skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [
                    ResBlock(ch, emb_channels, dropout, mult * model_channels, use_scale_shift_norm)
                ]
                ch = mult * model_channels
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads))
                self.blocks.append(TimestepEmbedSequential(*layers))
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_channels, dropout, ch, use_scale_shift_norm, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample)
                )
                self.blocks.append(TimestepEmbedSequential(down))
                self.skip_channels.append(ch)
                ds *= 2
        self.out_channels = ch
        self.out_ds = ds

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        h = x
        for block in self.blocks:
            h = _run(block, h, emb, self.use_checkpoint)
            skips.append(h)
        return h, skips


def middle_block(
    channels: int,
    emb_channels: int,
    dropout: float,
    num_heads: int,
    attention: bool,
    use_scale_shift_norm: bool = True,
) -> TimestepEmbedSequential:
    """IDDPM bottleneck ResBlock–Attention–ResBlock; a single ResBlock without ``attention`` (M2Diff's MRI path)."""
    if not attention:
        return TimestepEmbedSequential(ResBlock(channels, emb_channels, dropout, channels, use_scale_shift_norm))
    return TimestepEmbedSequential(
        ResBlock(channels, emb_channels, dropout, channels, use_scale_shift_norm),
        AttentionBlock(channels, num_heads),
        ResBlock(channels, emb_channels, dropout, channels, use_scale_shift_norm),
    )


class UNetDecoder(nn.Module):
    """IDDPM output blocks: per level ``num_res_blocks + 1`` ResBlocks on ``cat[h, skips...]`` (+ attention), upsample.

    ``skip_channels`` are the per-block channel counts of the concatenated skips, consumed in reverse encoder
    order; a fused decoder (M2Diff HFF) passes the sum of both encoders' counts. ``forward`` takes, for each
    decoder block in order, a sequence of skip tensors that are concatenated after ``h`` in one ``torch.cat``.
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: Sequence[int],
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_ds: set[int],
        num_heads: int,
        dropout: float,
        emb_channels: int,
        start_ds: int,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        skips = list(skip_channels)
        if len(skips) != len(channel_mult) * (num_res_blocks + 1):
            raise ValueError("skip_channels does not match channel_mult/num_res_blocks")
        self.blocks = nn.ModuleList()
        ch, ds = in_channels, start_ds
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(ch + skips.pop(), emb_channels, dropout, model_channels * mult, use_scale_shift_norm)
                ]
                ch = model_channels * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, num_heads))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_channels, dropout, ch, use_scale_shift_norm, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample)
                    )
                    ds //= 2
                self.blocks.append(TimestepEmbedSequential(*layers))
        self.out_channels = ch

    def forward(self, h: torch.Tensor, emb: torch.Tensor, skips: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        if len(skips) != len(self.blocks):
            raise ValueError(f"decoder needs {len(self.blocks)} skip groups, got {len(skips)}")
        for block, group in zip(self.blocks, skips, strict=True):
            h = _run(block, torch.cat([h, *group], dim=1), emb, self.use_checkpoint)
        return h
