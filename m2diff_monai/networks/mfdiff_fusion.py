"""MFdiff's multi-modality feature fusion module (paper Sec. 3.1, Fig. 2b–c).

Intra-modality learning (IML): two independent Restormer modality encoders (f_θp for LD PET, f_θm for MRI;
same architecture, separate weights — unlike CDDFuse, which shares one encoder), each followed by its own
two feature branches. Cross-modality aggregation (CMA): per branch a fusion layer of the same kind applied
to the SUM of the two modalities' branch features (CDDFuse), then a decoder (1×1 reduction of the two fused
maps, ``decoder_blocks`` transformer blocks, a 3×3 → LeakyReLU → 3×3 head) giving the fusion feature
F ∈ R^{C_f×H×W}.

Branch slots: the complete module has a ("global", "detail") pair. The ablation rows keep two slots so that
the parameter count stays similar, as the paper says: GMUNet "replaces the detail feature extraction branch
with a global feature extraction branch" → ("global", "global"); DMUNet → ("detail", "detail").

Missing MRI: ``mri_mask`` (B,) multiplies the MRI branch features before the sum, so a sample without MRI is
fused from its PET features alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .inn import DetailBranch
from .restormer import GlobalFeatureBlock, RestormerEncoder, TransformerBlock

BRANCH_KINDS = ("global", "detail")
OUTPUT_ACTIVATIONS = ("none", "sigmoid")


def _make_branch(
    kind: str,
    dim: int,
    heads: int,
    layer_norm: str,
    global_attention: str,
    global_ffn_expansion: float,
    inn_layers: int,
    coupling: str,
    bias: bool,
) -> nn.Module:
    if kind == "global":
        return GlobalFeatureBlock(dim, heads, global_ffn_expansion, bias, layer_norm, global_attention)
    if kind == "detail":
        return DetailBranch(dim, inn_layers, expand_ratio=2.0, coupling=coupling)
    raise ValueError(f"fusion branches must be drawn from {BRANCH_KINDS}, got {kind!r}")


class ModalityFeatureExtractor(nn.Module):
    """One modality's IML path: Restormer encoder, then one feature branch per slot."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        num_blocks: int,
        heads: int,
        ffn_expansion: float,
        bias: bool,
        layer_norm: str,
        branches: Sequence[str],
        **branch_kwargs,
    ):
        super().__init__()
        self.encoder = RestormerEncoder(in_channels, dim, num_blocks, heads, ffn_expansion, bias, layer_norm)
        self.branches = nn.ModuleList(
            [_make_branch(kind, dim, heads, layer_norm, bias=bias, **branch_kwargs) for kind in branches]
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        shallow = self.encoder(x)
        return [branch(shallow) for branch in self.branches]


class MFdiffFusion(nn.Module):
    """Fusion module: ``forward(ld, mri, mri_mask=None) -> F`` with F of shape (B, out_channels, H, W).

    Defaults are CDDFuse's where the paper is silent (``../shared/notes/facts.md`` §2); see
    ``docs/mfdiff-network.md`` for each assumption.
    """

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 64,
        num_blocks: int = 4,
        heads: int = 8,
        ffn_expansion: float = 2.0,
        bias: bool = False,
        layer_norm: str = "with_bias",
        branches: Sequence[str] = ("global", "detail"),
        global_attention: str = "channel",
        global_ffn_expansion: float = 1.0,
        inn_layers: int = 3,
        coupling: str = "paper",
        fusion_inn_layers: int = 1,
        decoder_blocks: int = 2,
        out_channels: int = 1,
        output_activation: str = "none",
    ):
        super().__init__()
        branches = tuple(branches)
        if len(branches) != 2:
            raise ValueError(f"the fusion module has two branch slots, got {branches!r}")
        if output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}")
        self.branches = branches
        self.out_channels = out_channels
        common = dict(global_attention=global_attention, global_ffn_expansion=global_ffn_expansion, coupling=coupling)
        encoder_args = (in_channels, dim, num_blocks, heads, ffn_expansion, bias, layer_norm, branches)
        self.pet = ModalityFeatureExtractor(*encoder_args, inn_layers=inn_layers, **common)
        self.mri = ModalityFeatureExtractor(*encoder_args, inn_layers=inn_layers, **common)
        self.fusion_layers = nn.ModuleList(
            [
                _make_branch(kind, dim, heads, layer_norm, bias=bias, inn_layers=fusion_inn_layers, **common)
                for kind in branches
            ]
        )
        self.reduce = nn.Conv2d(2 * dim, dim, kernel_size=1, bias=bias)
        self.decoder = nn.Sequential(
            *[TransformerBlock(dim, heads, ffn_expansion, bias, layer_norm) for _ in range(decoder_blocks)]
        )
        self.head = nn.Sequential(
            nn.Conv2d(dim, dim // 2, kernel_size=3, padding=1, bias=bias),
            nn.LeakyReLU(),
            nn.Conv2d(dim // 2, out_channels, kernel_size=3, padding=1, bias=bias),
        )
        self.output_activation = output_activation

    def forward(self, ld: torch.Tensor, mri: torch.Tensor, mri_mask: torch.Tensor | None = None) -> torch.Tensor:
        pet_features = self.pet(ld)
        mri_features = self.mri(mri)
        if mri_mask is not None:
            mask = mri_mask.reshape(-1, 1, 1, 1)
            mri_features = [f * mask.to(f.dtype) for f in mri_features]
        fused = [layer(p + m) for layer, p, m in zip(self.fusion_layers, pet_features, mri_features, strict=True)]
        out = self.head(self.decoder(self.reduce(torch.cat(fused, dim=1))))
        return torch.sigmoid(out) if self.output_activation == "sigmoid" else out
