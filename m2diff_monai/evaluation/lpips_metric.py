"""LPIPS (AlexNet) for PET slices, without ever downloading weights.

The network is :class:`m2diff_monai.evaluation.lpips_net.AlexLPIPS`, lpips v0.1 (AlexNet) rebuilt without
torchvision (which fails to import beside a CPU build of torch), equal to ``lpips.LPIPS(net="alex")``. Its
small linear heads ship with torchmetrics; the AlexNet backbone is torchvision's ImageNet checkpoint
``alexnet-owt-7be5be79.pth``, which lpips downloads at run time (impossible offline, notes/facts.md §6). So the
backbone's state dict is loaded here from ``weights_path`` when given (and only from there), else from the
environment variable ``M2DIFF_LPIPS_ALEXNET_WEIGHTS``, else from torch's hub cache
(``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``) if an online run left it there.

Without weights the metric is ``available = False`` with a one-line ``reason`` and returns NaN: never a crash,
never a silently random backbone (``_allow_random_backbone`` exists for tests of the code path only).

Conventions: images are scaled by ``data_range`` (default: the target's peak inside the mask, as in
:mod:`m2diff_monai.evaluation.metrics`) and clipped to [0, 1], then mapped to [−1, 1] as LPIPS expects; the
single PET channel is repeated to 3. A volume is scored slice by slice across ``slice_axis`` (default axial),
whole slices (LPIPS has no mask), only the slices holding at least ``min_slice_voxels`` mask voxels; the
result is the mean over those slices.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from m2diff_monai.evaluation.metrics import resolve_data_range

ALEXNET_WEIGHTS_FILENAME = "alexnet-owt-7be5be79.pth"
WEIGHTS_ENV_VAR = "M2DIFF_LPIPS_ALEXNET_WEIGHTS"


def _hub_weights_path() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS_FILENAME


def find_alexnet_weights(weights_path: str | os.PathLike | None = None) -> Path | None:
    """``weights_path`` if given (None when it does not exist: an explicit choice is never second-guessed),
    else the first existing of ``$M2DIFF_LPIPS_ALEXNET_WEIGHTS`` and torch's hub cache."""
    if weights_path is not None:
        return Path(weights_path) if Path(weights_path).is_file() else None
    for candidate in (os.environ.get(WEIGHTS_ENV_VAR) or None, _hub_weights_path()):
        if candidate is not None and Path(candidate).is_file():
            return Path(candidate)
    return None


class LPIPSMetric:
    """Callable LPIPS distance between a prediction and its reference (mean over 2D slices)."""

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        net: str = "alex",
        *,
        device: str = "cpu",
        batch_size: int = 16,
        _allow_random_backbone: bool = False,
    ):
        if net != "alex":
            raise ValueError(f"only net='alex' is supported (the paper's LPIPS), got {net!r}")
        self.device = device
        self.batch_size = int(batch_size)
        self.model = None
        self.available = False
        self.random_backbone = False
        from m2diff_monai.evaluation.lpips_net import (  # here: importing this module must not import torch
            HEADS_LOCATIONS,
            AlexLPIPS,
            lpips_heads_path,
        )

        self.weights_path = find_alexnet_weights(weights_path)
        heads = lpips_heads_path()
        if heads is None:
            where = " or ".join(f"{package}/{relative}" for package, relative in HEADS_LOCATIONS)
            self.reason = f"LPIPS unavailable: lpips v0.1 AlexNet heads not found ({where}); reinstall torchmetrics"
            return
        if self.weights_path is None and not _allow_random_backbone:
            where = f"{weights_path} does not exist; " if weights_path is not None else ""
            self.reason = (
                f"LPIPS unavailable: {where}AlexNet ImageNet weights ({ALEXNET_WEIGHTS_FILENAME}) not found; "
                f"set {WEIGHTS_ENV_VAR}=/path/to/{ALEXNET_WEIGHTS_FILENAME} or pass the LPIPS weights path "
                "(nothing is downloaded)"
            )
            return
        model = AlexLPIPS()
        try:
            model.load_heads(heads)
        except Exception as err:  # a damaged install must not crash an evaluation run either
            self.reason = " ".join(f"LPIPS unavailable: cannot load the lpips heads {heads}: {err}".split())
            return
        try:
            if self.weights_path is not None:
                import torch

                model.load_trunk(torch.load(self.weights_path, map_location="cpu", weights_only=True))
            else:
                self.random_backbone = True
        except Exception as err:  # a corrupt or foreign file must not crash an evaluation run
            message = f"LPIPS unavailable: cannot load AlexNet weights from {self.weights_path}: {err}"
            self.reason = " ".join(message.split())
            return
        self.model = model.to(device).eval()
        self.available = True
        self.reason = "random AlexNet backbone (tests only)" if self.random_backbone else ""

    def slice_values(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None = None,
        data_range: float | None = None,
        *,
        slice_axis: int = 2,
        min_slice_voxels: int = 1,
    ) -> np.ndarray:
        """LPIPS of every slice (NaN for slices without enough mask voxels, or everywhere when unavailable)."""
        pred, target = np.asarray(pred), np.asarray(target)
        if pred.shape != target.shape or pred.ndim not in (2, 3):
            raise ValueError(f"expected two 2D or 3D arrays of one shape, got {pred.shape} and {target.shape}")
        if min(pred.shape[i] for i in range(pred.ndim) if pred.ndim == 2 or i != int(slice_axis) % 3) < 32:
            raise ValueError(f"LPIPS (AlexNet) needs slices of at least 32×32 pixels, got shape {pred.shape}")
        if pred.ndim == 2:
            pred, target = pred[None], target[None]
            mask = None if mask is None else np.asarray(mask)[None]
            slice_axis = 0
        axis = int(slice_axis) % 3
        n = pred.shape[axis]
        values = np.full(n, np.nan)
        if not self.available:
            return values
        other = tuple(i for i in range(3) if i != axis)
        keep = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, bool).sum(axis=other) >= min_slice_voxels
        if not keep.any():
            return values
        dr = resolve_data_range(target, mask, data_range)
        index = np.flatnonzero(keep)
        for start in range(0, len(index), self.batch_size):
            chunk = index[start : start + self.batch_size]
            batch_pred = np.moveaxis(np.take(pred, chunk, axis=axis), axis, 0)
            batch_target = np.moveaxis(np.take(target, chunk, axis=axis), axis, 0)
            values[chunk] = self._score(batch_pred, batch_target, dr)
        return values

    def _score(self, pred: np.ndarray, target: np.ndarray, data_range: float) -> np.ndarray:
        import torch

        def to_tensor(batch: np.ndarray) -> torch.Tensor:
            x = torch.as_tensor(np.clip(batch / data_range, 0.0, 1.0), dtype=torch.float32, device=self.device)
            return (2.0 * x - 1.0).unsqueeze(1).expand(-1, 3, -1, -1)

        with torch.inference_mode():
            out = self.model(to_tensor(pred), to_tensor(target))
        return out.reshape(-1).double().cpu().numpy()

    def __call__(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        mask: np.ndarray | None = None,
        data_range: float | None = None,
        *,
        slice_axis: int = 2,
        min_slice_voxels: int = 1,
    ) -> float:
        """Mean LPIPS over the evaluated slices; NaN when unavailable (see ``reason``)."""
        values = self.slice_values(
            pred, target, mask, data_range, slice_axis=slice_axis, min_slice_voxels=min_slice_voxels
        )
        return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
