"""One subject's volumes on the evaluation grid: reference, LD, predictions, brain and region masks.

Where metrics are computed (``space``):

- ``native`` (default): on the LD PET's own voxel grid — the grid ``m2diff-infer`` writes predictions on — in
  original units. Reference = ``source_sd_pet`` (the SD PET file; the intake guarantees it is on the LD grid),
  LD row = ``source_ld_pet``. The brain mask and region masks of the preprocessed folder are carried back with
  nearest neighbour: for ``--space pet`` cubes that is an exact placement (the cube's affine is the source
  affine shifted by whole voxels), for ``--space mri`` cubes ANTs' inverse registration with
  ``nearestNeighbor``. Every array is reordered to RAS+ (flips/permutations only: the same voxels), so
  ``axial`` slices are planes of constant z whatever the file's storage order.
- ``preprocessed``: in the ``size``³ cube of the preprocessed folder, in original units (cube × the volume's own
  scaling from ``subject.json``); predictions are cut out of the native grid exactly (``--space pet`` cubes only).

The grid math (RAS+ reordering, placement, inverse registration) is :mod:`m2diff_monai.data.grid`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff_monai.data import grid
from m2diff_monai.data.manifest import item_path, read_subject_record
from m2diff_monai.errors import InputError
from m2diff_monai.evaluation.inputs import LD_METHOD, REFERENCE
from m2diff_monai.io import safety

READ_THREADS = 4


@dataclass
class SubjectVolumes:
    """One subject on the evaluation grid (canonical RAS+ voxel order), original units."""

    subject: str
    reference: np.ndarray
    volumes: dict[str, np.ndarray]  # "LD" then each method, in order
    mask: np.ndarray
    regions: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    notes: list[str] = field(default_factory=list)


def _read(path: Path, subject: str, what: str) -> nib.Nifti1Image:
    return grid.load_nifti(path, subject, missing=f"{what} does not exist", unreadable=f"cannot read the {what}")


def _canonical(img: nib.Nifti1Image, path: Path, subject: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Full read (nibabel raises on truncated files), 4D with one frame squeezed, reordered to RAS+."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:
        raise InputError(
            f"cannot read the {what}'s voxels ({type(err).__name__}: {' '.join(str(err).split())})",
            subject=subject,
            path=path,
        ) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what} must be a 3D volume, found shape {data.shape}", subject=subject, path=path)
    return grid.to_canonical(data, img.affine)


class _MaskMapper:
    """Carries the preprocessed folder's masks (cube grid) onto the evaluation grid with nearest neighbour."""

    def __init__(self, item: dict, base: Path, record: dict, subject: str, dst_shape, dst_affine, space: str):
        self.subject, self.dst_shape, self.dst_affine, self.space = subject, tuple(dst_shape), dst_affine, space
        self.cube_space = str(record.get("space", item.get("space", "pet")))
        folder = item_path(base, item.get("preprocessed_dir")) or base
        self.transforms = grid.stored_inverse_transforms(record, folder)

    def __call__(self, path: Path, what: str) -> np.ndarray:
        img = _read(path, self.subject, what)
        try:
            cube = np.asarray(img.dataobj) > 0.5
        except Exception as err:
            raise InputError(
                f"cannot read the {what}'s voxels ({type(err).__name__})", subject=self.subject, path=path
            ) from None
        if cube.ndim != 3:
            raise InputError(f"{what} must be a 3D volume, found shape {cube.shape}", subject=self.subject, path=path)
        affine = np.asarray(img.affine, dtype=np.float64)
        if self.space == "preprocessed":
            return cube
        if self.cube_space == "mri":  # the T1 grid: back through the inverse registration, nearest neighbour
            return (
                grid.map_back_through_registration(
                    cube, affine, self.dst_shape, self.dst_affine, self.transforms, order=0, subject=self.subject
                )
                > 0.5
            )
        return grid.to_grid(cube.astype(np.uint8), affine, self.dst_shape, self.dst_affine, order=0) > 0


def _masks(item: dict, base: Path, sid: str, mapper: _MaskMapper, reference: np.ndarray) -> tuple[np.ndarray, dict]:
    """The brain mask (checked: not empty, SD uptake inside) and the named region masks on the evaluation grid."""
    mask_path = item_path(base, item.get("brain_mask"))
    if mask_path is None:
        raise InputError("manifest volume item has no 'brain_mask'", subject=sid)
    mask = mapper(mask_path, "brain mask")
    if not mask.any():
        raise InputError("brain mask is empty on the evaluation grid", subject=sid, path=mask_path)
    if not (reference[mask] > 0).any():
        raise InputError("standard-dose reference has no positive value inside the brain mask", subject=sid)
    regions = {}
    for name, rel in sorted((item.get("regions") or {}).items()):
        safety.check_name(name, f"subject {sid}: region name")  # it names report columns
        region_path = item_path(base, rel)
        if region_path is not None:
            regions[str(name)] = mapper(region_path, f"region mask {name!r}")
    return mask, regions


def load_subject(item: dict, base: Path, predictions: Mapping[str, Path], space: str = "native") -> SubjectVolumes:
    """Reference, LD, predictions and masks of one manifest ``volumes`` item on the evaluation grid.

    ``predictions``: ``{method: prediction file}`` (on the LD PET's own grid, original units, as m2diff-infer
    writes). Raises :class:`InputError` naming the subject and file for anything unreadable or off-grid."""
    sid = str(item.get("subject"))
    record = read_subject_record(item, base, sid, required=False)
    notes: list[str] = []
    source_ld = item_path(base, item.get("source_ld_pet"))
    if source_ld is None:
        raise InputError(
            "manifest volume item has no 'source_ld_pet' (the grid predictions are written on)", subject=sid
        )
    source_sd = item_path(base, item.get("source_sd_pet")) if space == "native" else None
    if source_sd is not None and not source_sd.is_file():
        source_sd = None
    # gzip decompression releases the GIL: the LD, SD and prediction files are read concurrently
    reads = {LD_METHOD: (source_ld, "low-dose PET")}
    reads.update({m: (Path(p), f"{m} prediction") for m, p in predictions.items()})
    if source_sd is not None:
        reads[REFERENCE] = (source_sd, "standard-dose PET")
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(reads))) as pool:
        futures = {k: pool.submit(lambda p, w: _canonical(_read(p, sid, w), p, sid, w), *v) for k, v in reads.items()}
        loaded = {k: f.result() for k, f in futures.items()}
    ld_native, native_affine = loaded.pop(LD_METHOD)

    def on_ld_grid(key: str) -> np.ndarray:
        data, affine = loaded.pop(key)
        path, what = reads[key]
        if not grid.same_grid(data.shape, affine, ld_native.shape, native_affine):
            hint = (
                "the SD PET must share the LD PET's grid, as preprocessing requires"
                if key == REFERENCE
                else f"m2diff-infer writes predictions on the LD PET's own grid ({source_ld})"
            )
            raise InputError(
                f"{what} is not on the low-dose PET's grid (shape {data.shape} vs {ld_native.shape}, "
                f"or another affine); {hint}",
                subject=sid,
                path=path,
            )
        if not np.isfinite(data).all():
            raise InputError(f"{what} contains NaN or infinite values", subject=sid, path=path)
        return data

    preds_native = {m: on_ld_grid(m) for m in predictions}

    if space == "native":
        if source_sd is not None:
            reference = on_ld_grid(REFERENCE)
        else:
            reference = _cube_in_original_units(item, base, record, sid, "sd_pet")
            reference = grid.to_grid(reference[0], reference[1], ld_native.shape, native_affine, order=1)
            notes.append("reference: preprocessed SD cube mapped back (no source_sd_pet in the manifest)")
        grid_shape, grid_affine = ld_native.shape, native_affine
        volumes = {LD_METHOD: ld_native, **preds_native}
    else:
        reference, grid_affine = _cube_in_original_units(item, base, record, sid, "sd_pet")
        ld_cube, _ = _cube_in_original_units(item, base, record, sid, "ld_pet")
        grid_shape = reference.shape
        offset = grid.integer_offset(native_affine, grid_affine)
        if offset is None:
            raise InputError(
                "--space preprocessed needs cubes cut from the PET's own grid (--space pet "
                "preprocessing at the PET's native --spacing); use --space native",
                subject=sid,
            )
        volumes = {LD_METHOD: ld_cube, **{m: grid.place(v, offset, grid_shape) for m, v in preds_native.items()}}
    if not np.isfinite(reference).all():
        raise InputError("standard-dose reference contains NaN or infinite values", subject=sid)

    mapper = _MaskMapper(item, base, record, sid, grid_shape, grid_affine, space)
    mask, regions = _masks(item, base, sid, mapper, reference)
    return SubjectVolumes(sid, reference, volumes, mask, regions, grid.voxel_spacing(grid_affine), grid_affine, notes)


def _cube_in_original_units(item: dict, base: Path, record: dict, sid: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A preprocessed cube × its own scaling (``subject.json`` per-volume record; the item's LD scaling else)."""
    path = item_path(base, item.get(key))
    if path is None:
        raise InputError(f"manifest volume item has no '{key}'", subject=sid)
    img = _read(path, sid, f"preprocessed {key}")
    data, affine = _canonical(img, path, sid, f"preprocessed {key}")
    per_volume = ((record.get("normalization") or {}).get("per_volume") or {}).get(key) or {}
    scale = float(per_volume.get("scale", item.get("scale", 1.0)))
    offset = float(per_volume.get("offset", item.get("offset", 0.0)))
    return (data * np.float32(scale) + np.float32(offset)).astype(np.float32), affine


__all__ = ["SubjectVolumes", "load_subject"]
