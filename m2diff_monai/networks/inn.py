"""The invertible detail branch of the MFdiff fusion module (paper Eq. 4; CDDFuse ``DetailFeatureExtraction``).

Written here because no installed library has an affine-coupling INN whose coupling networks are
MobileNetV2 inverted residual blocks. The branch splits the channels into two halves and applies
``num_layers`` affine couplings; ``DetailBranch.inverse`` undoes it exactly (up to float rounding), which is
what makes the detail features "lossless" (paper Sec. 3.1.1).

Two coupling forms (config ``coupling``):

- ``"paper"`` (default) — as the paper writes it: D_f = F_f ⊙ exp(ρ(F_l)) + η(F_l), D_l = F_l.
  Assumption: ρ and η are two separate IRBs (the paper writes IRB(·) for both). Assumption: the halves swap
  roles after every coupling (the paper gives only the first layer; without a swap the second half would
  pass through all three layers unchanged).
- ``"cddfuse"`` — CDDFuse's ``DetailNode``: a 1×1 channel-mixing convolution with bias, then
  z2 += φ(z1) and z1 = z1 ⊙ exp(ρ(z2)) + η(z2). Assumption: the mixing convolution starts as a random
  orthogonal matrix (Glow) so its inverse is well conditioned; CDDFuse leaves PyTorch's default init.
"""

from __future__ import annotations

import torch
from torch import nn

COUPLING_FORMS = ("paper", "cddfuse")


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted residual block as CDDFuse uses it: no BatchNorm, no biases, no skip connection.

    1×1 expand (ratio 2) → ReLU6 → reflection-padded depthwise 3×3 → ReLU6 → 1×1 linear projection.
    Assumption: no identity skip and no BatchNorm, as in CDDFuse (MobileNetV2 has both).
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: float = 2.0):
        super().__init__()
        hidden = int(in_channels * expand_ratio)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False),
            nn.ReLU6(),
            nn.ReflectionPad2d(1),
            nn.Conv2d(hidden, hidden, kernel_size=3, groups=hidden, bias=False),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class AffineCoupling(nn.Module):
    """One invertible coupling on a pair of half-feature maps ``(a, b)`` -> ``(a', b')``."""

    def __init__(self, half_channels: int, expand_ratio: float = 2.0, form: str = "paper"):
        super().__init__()
        if form not in COUPLING_FORMS:
            raise ValueError(f"coupling must be one of {COUPLING_FORMS}, got {form!r}")
        self.form = form
        self.rho = InvertedResidual(half_channels, half_channels, expand_ratio)
        self.eta = InvertedResidual(half_channels, half_channels, expand_ratio)
        if form == "cddfuse":
            self.phi = InvertedResidual(half_channels, half_channels, expand_ratio)
            self.mix = nn.Conv2d(2 * half_channels, 2 * half_channels, kernel_size=1, bias=True)
            nn.init.orthogonal_(self.mix.weight)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "paper":
            # D_f = F_f ⊙ exp(ρ(F_l)) + η(F_l); D_l = F_l; then swap roles for the next coupling.
            a = a * torch.exp(self.rho(b)) + self.eta(b)
            return b, a
        a, b = self.mix(torch.cat((a, b), dim=1)).chunk(2, dim=1)
        b = b + self.phi(a)
        a = a * torch.exp(self.rho(b)) + self.eta(b)
        return a, b

    def inverse(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.form == "paper":
            b, a = a, b
            a = (a - self.eta(b)) * torch.exp(-self.rho(b))
            return a, b
        a = (a - self.eta(b)) * torch.exp(-self.rho(b))
        b = b - self.phi(a)
        mixed = torch.cat((a, b), dim=1) - self.mix.bias[None, :, None, None]
        weight = self.mix.weight[:, :, 0, 0]
        unmixed = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(weight), mixed)
        return unmixed.chunk(2, dim=1)


class DetailBranch(nn.Module):
    """Invertible detail feature extractor: split channels in halves, ``num_layers`` couplings, concatenate."""

    def __init__(self, channels: int, num_layers: int = 3, expand_ratio: float = 2.0, coupling: str = "paper"):
        super().__init__()
        if channels % 2:
            raise ValueError(f"the detail branch needs an even channel count, got {channels}")
        self.layers = nn.ModuleList([AffineCoupling(channels // 2, expand_ratio, coupling) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        for layer in self.layers:
            a, b = layer(a, b)
        return torch.cat((a, b), dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        a, b = y.chunk(2, dim=1)
        for layer in reversed(self.layers):
            a, b = layer.inverse(a, b)
        return torch.cat((a, b), dim=1)
