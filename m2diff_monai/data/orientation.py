"""Slicing canonical (RAS+) volumes into 2D stacks per orientation, and restacking them exactly.

One place owns this bookkeeping because preprocessing writes slices, inference restacks predictions, and any
disagreement between the two would silently transpose a patient's brain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")
ORIENTATION_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


def parse_orientations(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"axial,coronal"`` or a sequence → validated tuple, in the order given, without duplicates."""
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    names = [n for n in names if n]
    bad = [n for n in names if n not in ORIENTATION_AXIS]
    if bad or not names:
        raise ValueError(f"unknown orientation(s) {bad or names!r}; choose from {', '.join(ORIENTATIONS)}")
    return tuple(dict.fromkeys(names))


def axis_of(orientation: str) -> int:
    try:
        return ORIENTATION_AXIS[orientation]
    except KeyError:
        raise ValueError(f"unknown orientation {orientation!r}; choose from {', '.join(ORIENTATIONS)}") from None


def extract_slice(volume: np.ndarray, orientation: str, index: int) -> np.ndarray:
    """Slice ``index`` of ``orientation``: the two remaining axes keep their order."""
    return np.take(volume, index, axis=axis_of(orientation))


def volume_to_slices(volume, orientation: str):
    """(X, Y, Z) → (N, H, W) with the stacking axis first. Works for numpy arrays and torch tensors."""
    axis = axis_of(orientation)
    if isinstance(volume, np.ndarray):
        return np.moveaxis(volume, axis, 0)
    return volume.movedim(axis, 0)


def slices_to_volume(stack, orientation: str):
    """Exact inverse of :func:`volume_to_slices`."""
    axis = axis_of(orientation)
    if isinstance(stack, np.ndarray):
        return np.moveaxis(stack, 0, axis)
    return stack.movedim(0, axis)
