"""Three-orientation volume inference: slice, sample in batches, restack, fuse.

Slices that contain no brain are not sampled (training used only brain slices too), which is where most of the
time of a naive whole-stack loop would go. Batches stream through the sampler and only their results are kept, so
memory is bounded by ``batch_size`` slices' activations whatever the volume size.

Coverage: an orientation samples only its brain slices, so a voxel outside the brain's bounding box along some
stacking axis is predicted by fewer orientations (or none). Fusing would average those voxels with the zeros of
the unsampled slices; instead they get the mean of the orientations that did sample them (0 where none did).
Inside the brain's bounding box every orientation sampled every voxel and the fusion method applies unchanged.

``slice_minmax`` (models trained with ``--normalization slice``): each LD and T1 slice is min–max normalized on its
own before sampling, as the official loader did in training, and each predicted slice goes back to cube units with
its LD slice's range, ``pred = pred_norm · (max_LD − min_LD) + min_LD`` (the SD slice's own range is unknown at
inference). This happens per orientation and slice, before fusion, so the three orientations are fused in cube
units (original units up to the cube's positive scale), not in three different per-slice scales.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from m2diff_monai.data.grid import occupied_indices
from m2diff_monai.data.orientation import axis_of, slices_to_volume, volume_to_slices
from m2diff_monai.inference.consistency import ld_consistency
from m2diff_monai.inference.fusion import fuse_volumes
from m2diff_monai.inference.inferer import DiffusionSamplerInferer
from preprocessing.normalization import SliceRange, minmax_slices

# seeds of successive draws (K > 1) are this far apart, so draws never reuse a batch's noise
DRAW_SEED_STRIDE = 100_003


@dataclass
class VolumePrediction:
    """Fused prediction (normalized units, the preprocessed cube), per-orientation volumes (mean over the draws)
    and, for K > 1 draws, the per-voxel standard deviation of the fused draws (ddof=1)."""

    fused: np.ndarray
    per_orientation: dict[str, np.ndarray]
    std: np.ndarray | None = None
    sampled_slices: dict[str, int] = field(default_factory=dict)


class SliceGeometry:
    """The training transforms' optional in-plane centred pad/crop (``spatial_size``), and its exact inverse.

    The index maps come from MONAI's own ``ResizeWithPadOrCrop`` applied to index-coded images, so inference
    places slices exactly as training did (including MONAI's rounding for odd differences).
    """

    def __init__(self, shape: tuple[int, int], spatial_size: int | None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.identity = spatial_size is None or tuple([int(spatial_size)] * 2) == self.shape
        if self.identity:
            return
        from monai.transforms import ResizeWithPadOrCrop

        h, w = self.shape
        codes = np.stack(np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")).astype(np.float32)
        out = np.asarray(ResizeWithPadOrCrop((int(spatial_size),) * 2, mode="constant")(codes))
        rows, cols = out[0].max(axis=1).astype(int) - 1, out[1].max(axis=0).astype(int) - 1
        self.size = int(spatial_size)
        self.dst_rows, self.dst_cols = np.flatnonzero(rows >= 0), np.flatnonzero(cols >= 0)
        self.src_rows, self.src_cols = rows[self.dst_rows], cols[self.dst_cols]

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W) → (B, S, S)."""
        if self.identity:
            return batch
        out = np.zeros((batch.shape[0], self.size, self.size), dtype=batch.dtype)
        out[:, self.dst_rows[:, None], self.dst_cols[None, :]] = batch[
            :, self.src_rows[:, None], self.src_cols[None, :]
        ]
        return out

    def inverse(self, batch: np.ndarray) -> np.ndarray:
        """(B, S, S) → (B, H, W); pixels the crop dropped are 0."""
        if self.identity:
            return batch
        out = np.zeros((batch.shape[0], *self.shape), dtype=batch.dtype)
        out[:, self.src_rows[:, None], self.src_cols[None, :]] = batch[
            :, self.dst_rows[:, None], self.dst_cols[None, :]
        ]
        return out


def brain_slice_indices(brain_mask: np.ndarray | None, orientation: str, n_slices: int) -> np.ndarray:
    """Indices of the slices of ``orientation`` that contain brain (all slices without a mask)."""
    if brain_mask is None:
        return np.arange(n_slices)
    return occupied_indices(brain_mask, axis_of(orientation))


def predict_orientation(
    network: torch.nn.Module,
    inferer: DiffusionSamplerInferer,
    ld: np.ndarray,
    mri: np.ndarray | None,
    orientation: str,
    brain_mask: np.ndarray | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool | tqdm = False,
    spatial_size: int | None = None,
    slice_minmax: bool = False,
) -> np.ndarray:
    """Predict every brain-containing slice of one orientation, ``batch_size`` at a time, and restack them.

    ``progress``: True for a bar of its own, or a shared ``tqdm`` bar to advance by one per batch.
    ``slice_minmax``: per-slice min–max in, LD-slice range out (module docstring). Unsampled slices are 0.
    """
    device = torch.device(device)
    ld_stack = volume_to_slices(ld, orientation)
    mri_stack = None if mri is None else volume_to_slices(mri, orientation)
    todo = brain_slice_indices(brain_mask, orientation, ld_stack.shape[0])
    geometry = SliceGeometry(ld_stack.shape[1:], spatial_size)
    out = np.zeros(ld_stack.shape, dtype=np.float32)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), max(1, int(batch_size)))]
    own_bar = progress is True
    bar = tqdm(total=len(batches), desc=f"{orientation}", unit="batch", leave=False) if own_bar else progress or None

    def tensor(batch: np.ndarray) -> torch.Tensor:
        batch = geometry.forward(np.ascontiguousarray(batch, dtype=np.float32))  # pad after normalizing: zeros
        return torch.from_numpy(batch)[:, None].to(device, non_blocking=True)

    try:
        for index in batches:
            if bar is not None:
                bar.set_postfix_str(orientation)
            ld_batch, mri_batch = ld_stack[index], None if mri_stack is None else mri_stack[index]
            ld_range: SliceRange | None = None
            if slice_minmax:
                ld_batch, ld_range = minmax_slices(ld_batch)
                mri_batch = None if mri_batch is None else minmax_slices(mri_batch)[0]
            pred = inferer(tensor(ld_batch), network, mri=None if mri_batch is None else tensor(mri_batch))
            pred = geometry.inverse(pred[:, 0].float().cpu().numpy())
            out[index] = pred if ld_range is None else ld_range.invert(pred)
            if bar is not None:
                bar.update(1)
    finally:
        if own_bar:
            bar.close()
    return slices_to_volume(out, orientation)


def _coverage_count(brain_mask: np.ndarray | None, orientations: Sequence[str], shape: tuple[int, ...]) -> np.ndarray:
    """Per voxel, how many orientations sampled it (uint8, broadcast-friendly full array)."""
    count = np.zeros(shape, dtype=np.uint8)
    for o in orientations:
        axis = axis_of(o)
        sampled = np.zeros(shape[axis], dtype=np.uint8)
        sampled[brain_slice_indices(brain_mask, o, shape[axis])] = 1
        view = [1, 1, 1]
        view[axis] = shape[axis]
        count += sampled.reshape(view)
    return count


def fuse_with_coverage(
    per_orientation: dict[str, np.ndarray], count: np.ndarray, fusion: str, **fusion_kwargs
) -> np.ndarray:
    """``fuse_volumes`` where every orientation sampled the voxel; elsewhere the mean of those that did."""
    fused = fuse_volumes(per_orientation, method=fusion, **fusion_kwargs)
    n = len(per_orientation)
    partial = count < n
    if partial.any():
        total = np.zeros(fused.shape, dtype=np.float32)
        for vol in per_orientation.values():
            total += vol
        some = partial & (count > 0)
        fused[some] = np.maximum(total[some] / count[some], 0.0)
        fused[count == 0] = 0.0
    return fused


def predict_volume(
    network: torch.nn.Module,
    inferer: DiffusionSamplerInferer,
    ld: np.ndarray,
    mri: np.ndarray | None = None,
    brain_mask: np.ndarray | None = None,
    orientations: Sequence[str] = ("axial", "coronal", "sagittal"),
    fusion: str = "wavelet-stripe",
    samples: int = 1,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: bool = False,
    spatial_size: int | None = None,
    fusion_kwargs: dict | None = None,
    on_draw: Callable[[int], None] | None = None,
    slice_minmax: bool = False,
    ld_consistency_sigma: float | Sequence[float] | None = None,
) -> VolumePrediction:
    """Predict a normalized cube in each orientation and fuse; with ``samples`` K > 1, the mean and std of K
    fused draws (running Welford sums: memory does not grow with K).

    ``ld_consistency_sigma`` (voxels): each fused draw takes the LD PET's band below this Gaussian
    (:mod:`.consistency`); the per-orientation volumes stay as sampled.

    Draw k uses seed ``inferer.seed + DRAW_SEED_STRIDE·k`` so each draw is reproducible on its own.
    ``slice_minmax``: the ``slice`` normalization's per-slice min–max and LD-range way back (module docstring).
    """
    if samples < 1:
        raise ValueError("samples must be >= 1")
    if not orientations:
        raise ValueError("at least one orientation is needed")
    network.eval()
    shape = tuple(int(s) for s in ld.shape)
    count = _coverage_count(brain_mask, orientations, shape)
    batches_per_draw = sum(
        -(-len(brain_slice_indices(brain_mask, o, shape[axis_of(o)])) // max(1, int(batch_size))) for o in orientations
    )
    sampled = {o: int(len(brain_slice_indices(brain_mask, o, shape[axis_of(o)]))) for o in orientations}
    base_seed = inferer.seed
    mean = np.zeros(shape, dtype=np.float64)
    m2 = np.zeros(shape, dtype=np.float64) if samples > 1 else None
    orientation_sums = {o: np.zeros(shape, dtype=np.float32) for o in orientations}
    bar = tqdm(total=batches_per_draw * samples, desc="slices", unit="batch", disable=not progress)
    try:
        for k in range(samples):
            inferer.reseed(None if base_seed is None else int(base_seed) + DRAW_SEED_STRIDE * k)
            if samples > 1:
                bar.set_description(f"draw {k + 1}/{samples}")
            per_orientation = {
                o: predict_orientation(
                    network,
                    inferer,
                    ld,
                    mri,
                    o,
                    brain_mask,
                    batch_size,
                    device,
                    bar,
                    spatial_size,
                    slice_minmax=slice_minmax,
                )
                for o in orientations
            }
            for o, vol in per_orientation.items():
                orientation_sums[o] += vol
            fused = fuse_with_coverage(per_orientation, count, fusion, **(fusion_kwargs or {}))
            if ld_consistency_sigma is not None:
                fused = ld_consistency(fused, ld, ld_consistency_sigma)
            delta = fused - mean
            mean += delta / (k + 1)
            if m2 is not None:
                m2 += delta * (fused - mean)
            if on_draw is not None:
                on_draw(k)
    finally:
        bar.close()
        inferer.reseed(base_seed)
    std = None if m2 is None else np.sqrt(m2 / (samples - 1)).astype(np.float32)
    return VolumePrediction(
        fused=mean.astype(np.float32),
        per_orientation={o: (v / samples).astype(np.float32) for o, v in orientation_sums.items()},
        std=std,
        sampled_slices=sampled,
    )
