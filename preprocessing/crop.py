"""Stage 5: crop or zero-pad a canonical volume to a ``size``³ cube centred on the brain's bounding box.

The cube's affine is the source affine shifted by a whole number of voxels (``affine @ T(start)``), so every
cube voxel sits exactly on a source voxel centre: ``nibabel.processing.resample_from_to`` back to the source grid
reproduces the source values inside the cube exactly, and :func:`uncrop` does the same without interpolation
(the placement itself is :mod:`m2diff_monai.data.grid`'s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from m2diff_monai.data import grid
from m2diff_monai.errors import InputError

SIZE_MULTIPLE = 16  # the networks downsample 4 times (2**4); every supported size must divide by it


def validate_size(size: int) -> int:
    size = int(size)
    if size <= 0 or size % SIZE_MULTIPLE:
        raise ValueError(
            f"--size must be a positive multiple of {SIZE_MULTIPLE} (the networks halve it 4 times), got {size}"
        )
    return size


@dataclass(frozen=True)
class CropBox:
    """Cube ``[start, start + size)`` along each axis, in source voxel indices (start may be negative: padding)."""

    start: tuple[int, int, int]
    size: int

    def as_dict(self) -> dict:
        return {"start": [int(s) for s in self.start], "size": int(self.size)}


def crop_box(
    mask: np.ndarray,
    size: int,
    subject: str | None = None,
    path: str | None = None,
    spacing: tuple[float, ...] | None = None,
) -> CropBox:
    """The cube centred on ``mask``'s bounding box; InputError when the brain is larger than the cube (the message
    gives the voxel ``spacing`` the size counts in, when known)."""
    size = validate_size(size)
    extent_of_brain = grid.mask_extent(mask)
    if extent_of_brain is None:
        raise InputError(
            "no brain found in the PET (empty brain mask); is this a brain PET?", subject=subject, path=path
        )
    start = []
    for axis, (first, last) in enumerate(extent_of_brain):
        extent = last - first + 1
        if extent > size:
            at = "" if spacing is None else f" of {float(spacing[axis]):.3g} mm"
            raise InputError(
                f"the brain spans {extent} voxels{at} along axis {axis}, more than --size {size}; "
                f"use a larger --size (e.g. {(extent + SIZE_MULTIPLE - 1) // SIZE_MULTIPLE * SIZE_MULTIPLE})",
                subject=subject,
                path=path,
            )
        centre2 = first + last  # twice the centre, kept integral
        s = (centre2 - size + 1) // 2
        s = min(max(s, last - size + 1), first)  # rounding never pushes the brain out of the cube
        start.append(int(s))
    return CropBox(start=tuple(start), size=size)


def crop_or_pad(volume: np.ndarray, box: CropBox, fill: float = 0.0) -> np.ndarray:
    """The ``size``³ cube; voxels outside the source are ``fill``."""
    return grid.crop(volume, box.start, box.size, fill)


def uncrop(cube: np.ndarray, box: CropBox, source_shape: tuple[int, ...], fill: float = 0.0) -> np.ndarray:
    """Exact inverse placement: the cube back on the source grid (outside the cube: ``fill``)."""
    return grid.place(cube, box.start, source_shape, fill)


def cropped_affine(affine: np.ndarray, box: CropBox) -> np.ndarray:
    """Affine of the cube: voxel (0,0,0) of the cube is voxel ``start`` of the source."""
    return grid.shifted_affine(affine, box.start)
