"""Stage 6: choose the 2D slices per orientation and write them as ``(1, size, size)`` float32 npy files.

``all`` keeps every slice that contains brain. ``N`` samples N slice indices uniformly across the brain's
extent along the stacking axis (first to last brain slice, both included) — the paper's "uniformly sampled across
the entire axial range", so high-uptake regions are not over-represented. With fewer brain slices than N, every
brain slice is kept. Slicing itself is :mod:`m2diff_monai.data.orientation` (one owner of the axis bookkeeping).

``per_slice_minmax`` (the ``slice`` normalization): each written plane is min–max normalized on its own
(:func:`preprocessing.normalization.minmax_slices`, the official loader's per-slice normalization), so the training
slices of every orientation are exactly what the official data loader feeds the network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2diff_monai.data.grid import occupied_indices
from m2diff_monai.data.orientation import axis_of, extract_slice
from m2diff_monai.io.atomic import save_npy

from .normalization import minmax_slices


def parse_slices_per_subject(value: str | int | None) -> int | None:
    """``"all"``/None → None; a positive integer → itself."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return None
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"--slices-per-subject must be 'all' or a positive integer, got {value!r}") from None
    if int(value) <= 0:
        raise ValueError(f"--slices-per-subject must be 'all' or a positive integer, got {value}")
    return int(value)


def brain_slice_indices(mask: np.ndarray, orientation: str) -> np.ndarray:
    return occupied_indices(mask, axis_of(orientation))


def select_slices(mask: np.ndarray, orientation: str, per_subject: int | None) -> list[int]:
    """Slice indices (ascending) for one orientation; see the module docstring."""
    present = brain_slice_indices(mask, orientation)
    if present.size == 0:
        return []
    if per_subject is None or per_subject >= present.size:
        return [int(i) for i in present]
    wanted = np.linspace(present[0], present[-1], per_subject)
    # nearest brain slice to each uniform position, without repeats (a brain may have gaps in its extent)
    chosen: list[int] = []
    available = list(present)
    for w in wanted:
        j = int(np.argmin([abs(a - w) for a in available]))
        chosen.append(int(available.pop(j)))
    return sorted(chosen)


def slice_name(modality: str, index: int) -> str:
    return f"{modality}_{index:03d}.npy"


def write_slices(
    folder: Path,
    volumes: Mapping[str, np.ndarray],
    selection: Mapping[str, Sequence[int]],
    per_slice_minmax: bool = False,
) -> dict[str, dict[str, list[str]]]:
    """Write ``folder/slices/<orientation>/<modality>_<k:03d>.npy``; return the relative paths per orientation/modality.

    ``per_slice_minmax``: every plane min–max normalized on its own (degenerate planes → zeros)."""
    written: dict[str, dict[str, list[str]]] = {}
    for orientation, indices in selection.items():
        written[orientation] = {}
        for modality, volume in volumes.items():
            names = []
            for k in indices:
                rel = Path("slices") / orientation / slice_name(modality, k)
                plane = np.ascontiguousarray(extract_slice(volume, orientation, k), dtype=np.float32)[None]
                if per_slice_minmax:
                    plane, _ = minmax_slices(plane)
                save_npy(folder / rel, plane)
                names.append(rel.as_posix())
            written[orientation][modality] = names
    return written
