"""One physical scale: every subject is resampled to ONE voxel spacing before it is registered, masked and cut.

Why: the networks see 2D slices, and a convolution kernel learned on 4 mm voxels sees features at half their trained
size in a 2 mm scan. ``m2diff-preprocess run --spacing`` therefore brings every subject of a cohort to one target
spacing (recorded in the manifest's ``provenance.parameters.spacing``, copied by training into the checkpoint's
``config.data.preprocessing``), and ``m2diff-infer`` brings a new scan to the checkpoint's spacing and its
prediction back to the scan's own grid.

Decisions (labelled assumptions, documented in ``docs/preprocessing.md``):

- ``auto`` (default) = the cohort's per-axis median voxel spacing on the canonical RAS+ grid, over every subject of
  the table (not only a shard, so shards agree), as nnU-Net's plans do. With an even count the LOWER of the two
  middle values is taken (``statistics.median_low``), so the target is a spacing some subjects already have: they
  are not interpolated only because the cohort splits evenly, and the finer half is never degraded.
  The grid that is resampled is the grid the cubes are cut from: the PET grid (``--space pet``) or the T1 grid
  (``--space mri``); the other modality is registered onto the resampled grid (one interpolation, not two).
- ``native``: no resampling (each subject keeps its own voxel size, the behaviour before this option; manifests and
  checkpoints that record no spacing are read as ``native``).
- A subject whose spacing is within :data:`SAME_SPACING_TOLERANCE_MM` of the target on every axis is not
  resampled at all (its voxels are passed on untouched).
- The resampled grid keeps the field of view: the same direction cosines, the same centre, and
  ``round(n * native / target)`` voxels per axis. Intensities: trilinear interpolation (``order=1``) with edge
  values continued outside the field of view (``mode="nearest"``); masks: nearest neighbour. No anti-aliasing
  filter before downsampling (as ANTs' registration resampling, nnU-Net and ``ants.resample_image`` do); PET is
  band-limited by its point-spread function (4-6 mm FWHM), so a 2 → 4 mm step aliases little. Resampling is
  :func:`m2diff_monai.data.grid.resample` (``nibabel.processing.resample_from_to``), the call every tool uses;
  voxel sizes on the canonical grid are :func:`m2diff_monai.data.grid.canonical_spacing`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from m2diff_monai.data import grid
from m2diff_monai.errors import InputError

AUTO = "auto"
NATIVE = "native"
SAME_SPACING_TOLERANCE_MM = 1e-3
RECORD_DECIMALS = 4  # the recorded target spacing (mm) is rounded to 0.1 µm so JSON round trips are exact
PLAUSIBLE_SPACING_MM = (0.1, 20.0)

Spacing = tuple[float, float, float]


def parse_spacing(value: Any) -> str | Spacing:
    """``"auto"`` | ``"native"`` | ``X`` (isotropic, mm) | ``X,Y,Z`` (mm along the RAS+ axes) | a sequence → value.

    Raises ``ValueError`` with the option name for anything else (a CLI turns it into a one-line error)."""
    if value is None:
        return AUTO
    if isinstance(value, str):
        text = value.strip().lower()
        if text in (AUTO, NATIVE):
            return text
        parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    elif isinstance(value, (int, float)):
        parts = [value]
    else:
        parts = list(value)
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        raise ValueError(f"--spacing must be auto, native, X or X,Y,Z (mm), got {value!r}") from None
    if len(numbers) == 1:
        numbers *= 3
    low, high = PLAUSIBLE_SPACING_MM
    if len(numbers) != 3 or not all(np.isfinite(numbers)) or not all(low <= v <= high for v in numbers):
        raise ValueError(
            f"--spacing must be auto, native, X or X,Y,Z with each value in [{low:g}, {high:g}] mm, got {value!r}"
        )
    return tuple(round(v, RECORD_DECIMALS) for v in numbers)


def recorded_spacing(value: Any) -> Spacing | None:
    """A spacing read from a manifest or a checkpoint: a triple, or None (``native``/absent: no resampling)."""
    if value is None:
        return None
    parsed = parse_spacing(value)
    if parsed == AUTO:
        raise ValueError("a recorded spacing must be numbers or 'native', not 'auto'")
    return None if parsed == NATIVE else parsed


def header_spacing(path: str | Path) -> Spacing | None:
    """Canonical spacing from a file's header (no voxel read); None when the header cannot be read (the intake
    reports that file when its subject is processed)."""
    try:
        return grid.canonical_spacing(nib.load(str(path)).affine)
    except Exception:  # nibabel raises many types for bad files; the intake names the problem later
        return None


def cohort_spacing(spacings: Iterable[Spacing | None]) -> Spacing:
    """Per-axis lower median of the readable spacings (see the module docstring for why the lower one)."""
    known = [s for s in spacings if s is not None]
    if not known:
        raise InputError(
            "--spacing auto: no readable image header to take the cohort's median voxel spacing from; "
            "give --spacing X or X,Y,Z"
        )
    return tuple(round(statistics.median_low(s[axis] for s in known), RECORD_DECIMALS) for axis in range(3))


def resolve_target(value: Any, grid_files: Iterable[str | Path | None]) -> Spacing | None:
    """The spacing a run resamples to: None for ``native``, the given triple, or the cohort's median over
    ``grid_files`` (the LD PETs for ``--space pet``, the T1s for ``--space mri``) for ``auto``."""
    parsed = parse_spacing(value)
    if parsed == NATIVE:
        return None
    if parsed == AUTO:
        return cohort_spacing(header_spacing(p) for p in grid_files if p)
    return parsed


def same_spacing(affine: np.ndarray, target: Spacing | None) -> bool:
    """True when a canonical grid already has the target spacing (or there is no target)."""
    if target is None:
        return True
    native = np.asarray(grid.voxel_spacing(affine))
    return bool(np.all(np.abs(native - np.asarray(target, dtype=np.float64)) <= SAME_SPACING_TOLERANCE_MM))


def target_grid(shape: tuple[int, ...], affine: np.ndarray, target: Spacing) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the grid with spacing ``target`` covering the same field of view: same direction
    cosines, same centre, ``round(n * native / target)`` voxels per axis (at least one)."""
    affine = np.asarray(affine, dtype=np.float64)
    native = np.asarray(grid.voxel_spacing(affine))
    target_arr = np.asarray(target, dtype=np.float64)
    old_shape = np.asarray(shape[:3], dtype=np.float64)
    new_shape = np.maximum(np.rint(old_shape * native / target_arr), 1).astype(int)
    directions = affine[:3, :3] / native
    centre = affine[:3, :3] @ ((old_shape - 1) / 2.0) + affine[:3, 3]
    out = np.eye(4)
    out[:3, :3] = directions * target_arr
    out[:3, 3] = centre - out[:3, :3] @ ((new_shape - 1) / 2.0)
    return tuple(int(n) for n in new_shape), out


def resample_image(
    img: nib.Nifti1Image, shape: tuple[int, ...], to_affine: np.ndarray, order: int = 1
) -> nib.Nifti1Image:
    """An in-memory float32 image on ``(shape, to_affine)`` with qform and sform set (like the intake's)."""
    data = grid.resample(
        np.asarray(img.dataobj, dtype=np.float32), img.affine, shape, to_affine, order=order, mode="nearest"
    )
    out = nib.Nifti1Image(data, np.asarray(to_affine, dtype=np.float64))
    out.set_qform(to_affine, code=1)
    out.set_sform(to_affine, code=1)
    return out


def resample_subject(loaded, target: Spacing | None, space: str):
    """A loaded subject (``preprocessing.intake.LoadedSubject``) with the images of the cube grid at ``target``.

    ``space="pet"``: LD PET, SD PET (the intake put it on the LD grid) and region masks (nearest neighbour);
    ``space="mri"``: the T1 only (the PET is registered onto it afterwards). Returns ``(subject, record)``:
    the record (for ``subject.json``) says what was done; unchanged subjects are returned as they are."""
    grid_image = loaded.ld_pet if space == "pet" else loaded.mri
    if grid_image is None or same_spacing(grid_image.affine, target):
        return loaded, {"target_spacing": None if target is None else list(target), "resampled": False}
    shape, affine = target_grid(grid_image.shape, grid_image.affine, target)
    record = {
        "target_spacing": list(target),
        "resampled": True,
        "grid": "ld_pet" if space == "pet" else "mri",
        "native_spacing": list(grid.voxel_spacing(grid_image.affine)),
        "native_shape": [int(v) for v in grid_image.shape[:3]],
        "shape": list(shape),
        "interpolation": {"images": "linear", "masks": "nearest"},
    }
    if space == "mri":
        return replace(loaded, mri=resample_image(loaded.mri, shape, affine)), record
    return replace(
        loaded,
        ld_pet=resample_image(loaded.ld_pet, shape, affine),
        sd_pet=None if loaded.sd_pet is None else resample_image(loaded.sd_pet, shape, affine),
        masks={name: resample_image(m, shape, affine, order=0) for name, m in loaded.masks.items()},
    ), record
