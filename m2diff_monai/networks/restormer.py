"""Restormer building blocks for the MFdiff fusion module (CDDFuse layout).

Written here because neither MONAI nor torch ships Restormer's channel ("transposed") attention, its
gated-dconv feed-forward or its channel LayerNorm for NCHW maps. The layout follows Restormer
(Zamir et al., CVPR 2022) as used by CDDFuse (Zhao et al., CVPR 2023), whose fusion module MFdiff reuses
block for block (``../shared/notes/facts.md`` §2).

- ``ChannelLayerNorm``: LayerNorm over the channel axis of an NCHW map, Restormer's two kinds
  (``"with_bias"``: (x − μ)/σ·w + b; ``"bias_free"``: x/σ·w, no mean subtraction — Restormer's definition).
- ``ChannelAttention`` (MDTA): multi-head attention whose tokens are the C/heads channels of a head and whose
  token vectors are the H·W pixels; q and k are L2-normalised along pixels and scaled by a learned per-head
  temperature, so the attention map is C×C and the cost is linear in H·W.
- ``SpatialAttention``: plain multi-head self-attention over the H·W pixels (the paper's wording for the global
  branch, "spatial self-attention"), quadratic in H·W.
- ``GatedDconvFFN`` (GDFN): 1×1 expand to 2·hidden, depthwise 3×3, GELU(x1)·x2 gate, 1×1 project.
- ``TransformerBlock``: LN → attention → residual, LN → FFN → residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_KINDS = ("with_bias", "bias_free")
ATTENTION_KINDS = ("channel", "spatial")


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels of an NCHW map; statistics in float32 so bf16 autocast stays stable."""

    def __init__(self, channels: int, kind: str = "with_bias", eps: float = 1e-5):
        super().__init__()
        if kind not in LAYER_NORM_KINDS:
            raise ValueError(f"layer_norm must be one of {LAYER_NORM_KINDS}, got {kind!r}")
        self.kind = kind
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if kind == "with_bias" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.bias is not None:
            # F.layer_norm over a channels-last view: one fused kernel, 2.5x faster (fwd+bwd, CPU) than the
            # strided mean/var over dim 1 of an NCHW map.
            y = F.layer_norm(x32.permute(0, 2, 3, 1), (x32.shape[1],), self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2).contiguous().to(x.dtype)
        var = x32.var(dim=1, keepdim=True, unbiased=False)
        y = x32 * torch.rsqrt(var + self.eps) * self.weight[:, None, None]
        return y.to(x.dtype)


class ChannelAttention(nn.Module):
    """Restormer's MDTA: transposed (C×C) multi-head attention with a 3×3 convolution on q, k, v.

    ``depthwise_qkv=True`` is Restormer's MDTA (1×1 conv then depthwise 3×3); ``False`` is CDDFuse's
    ``AttentionBase`` of the global branch (1×1 conv then a full 3×3 conv on the 3·C maps).

    Uses ``F.scaled_dot_product_attention``: per head the C/heads channels are the tokens and the H·W
    pixels are the embedding. The per-head learned temperature is folded into q and SDPA runs with
    ``scale=1``, which is exactly softmax(temperature · q̂ k̂ᵀ) v. (On GPU the fused kernels refuse an
    embedding of H·W > 256 and SDPA falls back to its math kernel; the C×C map is small, so that is cheap.)
    """

    def __init__(self, dim: int, heads: int, bias: bool = False, depthwise_qkv: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        groups = dim * 3 if depthwise_qkv else 1
        self.qkv_conv = nn.Conv2d(dim * 3, dim * 3, kernel_size=3, padding=1, groups=groups, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_conv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.temperature.to(q.dtype)
        k = F.normalize(k, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.project_out(out.reshape(b, c, h, w))


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the H·W pixels (SDPA), 1×1 convolutions for q, k, v and output.

    Memory is quadratic in H·W unless SDPA picks a fused (flash / memory-efficient) kernel, i.e. on GPU.
    """

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.project_out(out.transpose(-1, -2).reshape(b, c, h, w))


class GatedDconvFFN(nn.Module):
    """Restormer's GDFN. ``paired_groups=True`` is CDDFuse's global-branch ``Mlp`` variant, whose
    3×3 convolution has ``groups=hidden`` (two channels per group) instead of being fully depthwise."""

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False, paired_groups: bool = False):
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        groups = hidden if paired_groups else hidden * 2
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=groups, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Restormer transformer block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(
        self, dim: int, heads: int, ffn_expansion: float = 2.0, bias: bool = False, layer_norm: str = "with_bias"
    ):
        super().__init__()
        self.norm1 = ChannelLayerNorm(dim, layer_norm)
        self.attn = ChannelAttention(dim, heads, bias=bias, depthwise_qkv=True)
        self.norm2 = ChannelLayerNorm(dim, layer_norm)
        self.ffn = GatedDconvFFN(dim, ffn_expansion, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class GlobalFeatureBlock(nn.Module):
    """The global branch (paper Eq. 3): G' = MHA(LN(F)) + F, G = MLP(LN(G')) + G'.

    Defaults are CDDFuse's ``BaseFeatureExtraction``: LayerNorm with bias, channel attention with a full 3×3
    qkv convolution, MLP = GDFN with expansion 1 and paired groups. ``attention="spatial"`` follows the
    paper's words ("Transformer with spatial self-attention") instead.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_expansion: float = 1.0,
        bias: bool = False,
        layer_norm: str = "with_bias",
        attention: str = "channel",
    ):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"global attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        self.norm1 = ChannelLayerNorm(dim, layer_norm)
        if attention == "channel":
            self.attn = ChannelAttention(dim, heads, bias=bias, depthwise_qkv=False)
        else:
            self.attn = SpatialAttention(dim, heads, bias=bias)
        self.norm2 = ChannelLayerNorm(dim, layer_norm)
        self.mlp = GatedDconvFFN(dim, ffn_expansion, bias=bias, paired_groups=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RestormerEncoder(nn.Module):
    """Modality encoder: overlapped patch embedding (3×3 conv) followed by ``num_blocks`` transformer blocks."""

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 64,
        num_blocks: int = 4,
        heads: int = 8,
        ffn_expansion: float = 2.0,
        bias: bool = False,
        layer_norm: str = "with_bias",
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=3, padding=1, bias=bias)
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, ffn_expansion, bias, layer_norm) for _ in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patch_embed(x))
