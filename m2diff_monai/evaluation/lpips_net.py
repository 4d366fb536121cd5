"""LPIPS v0.1 with an AlexNet trunk (Zhang et al. 2018), rebuilt without torchvision or the ``lpips`` package.

Why: the ``lpips`` package builds its trunk through ``torchvision.models.alexnet``, and PyPI's torchvision is a
CUDA build whose compiled ops fail to load beside a CPU build of torch (``import torchvision`` raises
"operator torchvision::nms does not exist"), so a CPU-only install could not compute LPIPS at all. The network
is small enough to rebuild exactly:

- trunk: torchvision's AlexNet ``features`` (five convolutions), with torchvision's parameter names
  (``features.<i>.weight|bias``) so that its ImageNet checkpoint ``alexnet-owt-7be5be79.pth`` loads as is;
  LPIPS taps the five ReLU outputs (``features`` indices 1, 4, 7, 9, 11);
- heads: five 1×1 convolutions without bias, read from lpips' ``weights/v0.1/alex.pth``, of which torchmetrics
  (a dependency) ships a byte-identical copy (``torchmetrics/functional/image/lpips_models/alex.pth``); the
  ``lpips`` package's own copy is used when torchmetrics' is missing;
- forward as ``lpips.LPIPS(net="alex", version="0.1").forward``: inputs in [−1, 1] are shifted and scaled per
  channel (a one-channel input broadcasts to RGB, as in lpips), each tapped feature map is unit-normalized over
  channels (eps 1e-10), the squared differences go through the heads, are averaged over space and summed over
  the five layers. Output shape (N, 1, 1, 1), as lpips.

tests/test_lpips_net.py pins the outputs to values the real ``lpips`` 0.1.4 package computed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
# (package, file inside it) holding lpips' v0.1 AlexNet heads, in order of preference
HEADS_LOCATIONS = (("torchmetrics", "functional/image/lpips_models/alex.pth"), ("lpips", "weights/v0.1/alex.pth"))
_TAPS = (1, 4, 7, 9, 11)  # torchvision AlexNet ``features`` indices of the ReLUs lpips reads
_SHIFT = (-0.030, -0.088, -0.188)  # lpips.ScalingLayer
_SCALE = (0.458, 0.448, 0.450)


def lpips_heads_path() -> Path | None:
    """The first existing file of :data:`HEADS_LOCATIONS`, found without importing either package."""
    for package, relative in HEADS_LOCATIONS:
        spec = importlib.util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec is not None else []:
            if (Path(root) / relative).is_file():
                return Path(root) / relative
    return None


def alexnet_features() -> nn.Sequential:
    """torchvision's ``AlexNet.features`` up to its last ReLU (the trailing max-pool has no weights and LPIPS
    does not use it)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
    )


def _unit_channels(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class AlexLPIPS(nn.Module):
    """LPIPS v0.1 (AlexNet): ``model(a, b)`` → (N, 1, 1, 1) distances of images in [−1, 1].

    Parameters: ``features.<i>.*`` (the trunk, torchvision's names; random until :meth:`load_trunk`) and
    ``heads.<k>.weight`` (loaded from lpips' v0.1 file by :meth:`load_heads`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = alexnet_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in ALEXNET_CHANNELS)
        self.requires_grad_(False)

    def load_trunk(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision AlexNet state dict (only ``features.*`` is used; every trunk weight must be there)."""
        trunk = {key: value for key, value in state.items() if key.startswith("features.")}
        self.load_state_dict(
            {**trunk, **{k: v for k, v in self.state_dict().items() if k.startswith("heads.")}}, strict=True
        )

    def load_heads(self, path: str | Path) -> None:
        """Load lpips' head file (keys ``lin<k>.model.1.weight``)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, head in enumerate(self.heads):
            weight = state[f"lin{k}.model.1.weight"]
            if weight.shape != head.weight.shape:
                raise ValueError(f"{path}: lin{k} has shape {tuple(weight.shape)}, expected {tuple(head.weight.shape)}")
            head.weight.copy_(weight)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five ReLU outputs LPIPS compares, for an input already shifted and scaled."""
        out = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in _TAPS:
                out.append(x)
        return out

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        both = (torch.cat([in0, in1]) - self.shift) / self.scale  # one pass through the trunk for both
        total = 0.0
        for head, feats in zip(self.heads, self.taps(both), strict=True):
            f0, f1 = feats.chunk(2)
            total = total + head((_unit_channels(f0) - _unit_channels(f1)) ** 2).mean(dim=(2, 3), keepdim=True)
        return total
