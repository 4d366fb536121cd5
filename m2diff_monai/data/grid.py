"""Grid geometry: the one implementation every tool calls to move voxels between grids.

A grid is a shape and a nibabel affine (voxel index → RAS+ millimetres). Preprocessing, inference, evaluation and
the simulator all reorient files to canonical RAS+, measure voxel sizes, cut a cube out of a grid and put it back,
hand images to ANTs and map predictions back through the stored registration. Each of those is written here once,
so the way in and the way back cannot drift apart (a mismatch silently shifts or flips a patient's brain).

What is exact and what interpolates:

- reorientation to RAS+ and back (:func:`to_canonical`, :func:`from_canonical`) only flips and permutes axes
  (``nibabel.io_orientation``, the rule of ``nibabel.as_closest_canonical``): the same voxels, exactly;
- placement (:func:`place`, :func:`crop`, :func:`to_grid` when :func:`integer_offset` finds a whole-voxel shift)
  copies voxels: exact;
- :func:`resample` (``nibabel.processing.resample_from_to``) and :func:`map_back_through_registration` (ANTs)
  interpolate.

Layering: this module is a foundation. It imports numpy, nibabel and :mod:`m2diff_monai.errors` only, and ANTs
lazily inside the functions that need it (worker processes set their ITK thread count before the first import).
``preprocessing`` and every upper layer of ``m2diff_monai`` may import it; it imports none of them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from m2diff_monai.errors import InputError

Spacing = tuple[float, float, float]

RAS_ORNT = nib.orientations.axcodes2ornt("RAS")
# nibabel affines are RAS+, ITK/ANTs physical space is LPS+: the first two world axes change sign.
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# Two affines place "the same" voxels when their integer-shift test passes within these tolerances.
_ROTATION_ATOL = 1e-4
_SHIFT_ATOL_VOXELS = 1e-3
# ANTs interpolators by scipy/nibabel spline order (0: labels and masks, 1: intensities).
ANTS_INTERPOLATORS = {0: "nearestNeighbor", 1: "linear"}


# ---------------------------------------------------------------------------------------------------- spacing
def voxel_spacing(affine: np.ndarray) -> Spacing:
    """Voxel size (mm) along each array axis: the norms of the affine's columns (exact for oblique grids)."""
    norms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(float(v) for v in norms)  # type: ignore[return-value]


def canonical_spacing(affine: np.ndarray, zooms: Sequence[float] | None = None) -> Spacing:
    """Voxel size along the axes of the canonical RAS+ image of a file with this affine (:func:`to_canonical`
    permutes the axes). ``zooms``: the sizes to permute (default: the affine's column norms)."""
    sizes = voxel_spacing(affine) if zooms is None else tuple(float(z) for z in zooms[:3])
    out = [0.0, 0.0, 0.0]
    for axis, (ras_axis, _flip) in enumerate(canonical_orientation(affine)):
        out[int(ras_axis)] = float(sizes[axis])
    return tuple(out)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- reorientation
def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation (array axis → RAS axis, flip) of the closest canonical grid."""
    return nib.io_orientation(np.asarray(affine, dtype=np.float64))


def canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of the RAS+ image :func:`to_canonical` makes of a grid, without touching voxels."""
    ornt = canonical_orientation(affine)
    shape3 = tuple(int(s) for s in shape[:3])
    canonical_shape = tuple(shape3[int(a)] for a in np.argsort(ornt[:, 0]))
    canonical_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, shape3)
    return canonical_shape, canonical_affine  # type: ignore[return-value]


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An array on ``affine`` → (the same voxels in RAS+ order, their affine). Flips and permutations only, so
    ``from_canonical(to_canonical(d, a)[0], a) == d`` exactly; a 3D grid with any extra trailing axes."""
    ornt = canonical_orientation(affine)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(data), ornt))
    return out, canonical_grid(np.shape(data)[:3], affine)[1]


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Exact inverse of :func:`to_canonical`: a RAS+ array → the voxel order of the grid whose affine is
    ``affine`` (the original file's affine, not the canonical one)."""
    transform = nib.orientations.ornt_transform(RAS_ORNT, canonical_orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(np.asarray(data), transform))


# ------------------------------------------------------------------------------------------- comparing grids
def _corners(shape: Sequence[int]) -> np.ndarray:
    """Homogeneous index coordinates (4, 8) of a grid's corner voxel centres."""
    hi = [int(s) - 1.0 for s in shape[:3]]
    points = np.array(list(itertools.product(*zip([0.0] * 3, hi, strict=True))), dtype=np.float64)
    return np.vstack([points.T, np.ones(8)])


def grid_distance(affine_a: np.ndarray, affine_b: np.ndarray, shape: Sequence[int]) -> float:
    """Largest world distance (mm) between the corner voxel centres two affines place for ``shape`` (an affine
    map moves no voxel of the grid farther than its farthest corner)."""
    corners = _corners(shape)
    moved = (np.asarray(affine_a, dtype=np.float64) - np.asarray(affine_b, dtype=np.float64)) @ corners
    return float(np.max(np.linalg.norm(moved[:3], axis=0)))


def same_grid(
    shape_a: Sequence[int],
    affine_a: np.ndarray,
    shape_b: Sequence[int],
    affine_b: np.ndarray,
    tolerance_voxels: float = 0.1,
) -> bool:
    """Equal shapes and no voxel centre farther apart than ``tolerance_voxels`` of the smallest voxel size."""
    if tuple(int(s) for s in shape_a[:3]) != tuple(int(s) for s in shape_b[:3]):
        return False
    return grid_distance(affine_a, affine_b, shape_a) <= tolerance_voxels * min(voxel_spacing(affine_a))


# ---------------------------------------------------------------------------------------------------- placement
def shifted_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of a grid whose voxel (0, 0, 0) is voxel ``start`` of ``affine``'s grid (a crop or a padding)."""
    shift = np.eye(4)
    shift[:3, 3] = [int(s) for s in start[:3]]
    return np.asarray(affine, dtype=np.float64) @ shift


def integer_offset(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray | None:
    """Where voxel (0, 0, 0) of the source grid lies on the destination grid when the two differ by a
    whole-voxel shift only (a cube and the grid it was cut from); None otherwise."""
    m = np.linalg.solve(np.asarray(dst_affine, dtype=np.float64), np.asarray(src_affine, dtype=np.float64))
    shift = m[:3, 3]
    if np.allclose(m[:3, :3], np.eye(3), atol=_ROTATION_ATOL) and np.allclose(
        shift, np.round(shift), atol=_SHIFT_ATOL_VOXELS
    ):
        return np.round(shift).astype(int)
    return None


def place(src: np.ndarray, offset: Sequence[int], dst_shape: Sequence[int], fill: float = 0.0) -> np.ndarray:
    """A new ``dst_shape`` array holding ``src`` with its voxel 0 at ``offset`` (negative: ``src`` is cut);
    voxels ``src`` does not cover are ``fill``. Exact: voxels are copied, never interpolated."""
    out = np.full(tuple(int(s) for s in dst_shape[:3]), fill, dtype=src.dtype)
    src_slices, dst_slices = [], []
    for axis in range(3):
        start = int(offset[axis])
        lo, hi = max(start, 0), min(start + src.shape[axis], out.shape[axis])
        if hi <= lo:
            return out
        dst_slices.append(slice(lo, hi))
        src_slices.append(slice(lo - start, hi - start))
    out[tuple(dst_slices)] = src[tuple(src_slices)]
    return out


def crop(volume: np.ndarray, start: Sequence[int], size: int | Sequence[int], fill: float = 0.0) -> np.ndarray:
    """The block ``[start, start + size)`` of ``volume`` (outside the volume: ``fill``); exact inverse of
    ``place(block, start, volume.shape)`` inside the volume."""
    shape = (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)  # type: ignore[arg-type]
    return place(volume, [-int(s) for s in start[:3]], shape, fill)


def occupied_indices(mask: np.ndarray, axis: int) -> np.ndarray:
    """Ascending indices along ``axis`` of the slices holding at least one True voxel (empty for an empty mask)."""
    other = tuple(a for a in range(np.ndim(mask)) if a != axis)
    return np.flatnonzero(np.asarray(mask).any(axis=other))


def mask_extent(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """Inclusive ``(first, last)`` index of ``mask`` along each axis; None for an empty mask, so that every
    caller states its own policy for it (raise, skip, or use the whole volume)."""
    extent = []
    for axis in range(np.ndim(mask)):
        hit = occupied_indices(mask, axis)
        if hit.size == 0:
            return None
        extent.append((int(hit[0]), int(hit[-1])))
    return tuple(extent)


def mask_box(mask: np.ndarray, margin: int = 0, axes: Sequence[int] | None = None) -> tuple[slice, ...] | None:
    """Slices of ``mask``'s bounding box grown by ``margin`` voxels along ``axes`` (all axes when None) and
    clipped to the array; None for an empty mask."""
    extent = mask_extent(mask)
    if extent is None:
        return None
    grown = range(np.ndim(mask)) if axes is None else axes
    return tuple(
        slice(max(0, first - (margin if axis in grown else 0)), min(n, last + 1 + (margin if axis in grown else 0)))
        for axis, ((first, last), n) in enumerate(zip(extent, np.shape(mask), strict=True))
    )


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    to_affine: np.ndarray,
    order: int = 1,
    mode: str = "nearest",
    cval: float = 0.0,
) -> np.ndarray:
    """``data`` on ``affine`` → the grid ``(shape, to_affine)`` by affines (``nibabel.processing.resample_from_to``):
    trilinear (``order=1``) or nearest neighbour (``0``); outside the source: edge values continued
    (``mode="nearest"``) or ``cval`` (``mode="constant"``). float32 out (the input dtype for ``order=0``)."""
    from nibabel.processing import resample_from_to

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    out = resample_from_to(
        img,
        (tuple(int(s) for s in shape[:3]), np.asarray(to_affine, dtype=np.float64)),
        order=order,
        mode=mode,
        cval=cval,
    )
    return np.asarray(out.dataobj, dtype=np.asarray(data).dtype if order == 0 else np.float32)


def to_grid(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    to_affine: np.ndarray,
    order: int = 1,
    mode: str = "constant",
    fill: float = 0.0,
) -> np.ndarray:
    """``data`` onto ``(shape, to_affine)``: exact placement when the grids differ by a whole-voxel shift, else
    :func:`resample` (voxels outside the source: ``fill`` for ``mode="constant"``, the edge for ``"nearest"``)."""
    offset = integer_offset(affine, to_affine)
    if offset is not None:
        return place(np.asarray(data), offset, shape, fill)
    return resample(data, affine, shape, to_affine, order=order, mode=mode, cval=fill)


# --------------------------------------------------------------------------------------------------- a file's grid
def load_nifti(path: str | Path, subject: str | None, *, missing: str, unreadable: str) -> nib.Nifti1Image:
    """``nibabel.load`` (header only; voxels stay on disk) with one-line ``InputError``s naming the subject and the
    file: ``missing`` for an absent file, ``unreadable (ErrorType: reason)`` for anything else nibabel raises."""
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise InputError(missing, subject=subject, path=path) from None
    except Exception as err:  # nibabel raises many types for bad files
        reason = " ".join(str(err).split())
        raise InputError(f"{unreadable} ({type(err).__name__}: {reason})", subject=subject, path=path) from None


@dataclass
class SourceGrid:
    """A NIfTI file's own grid (the input LD PET): predictions are written on it, voxel for voxel."""

    path: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    header: nib.Nifti1Header

    @classmethod
    def from_file(cls, path: str | Path, subject: str | None = None, what: str = "low-dose PET") -> SourceGrid:
        """Header only (the voxels were read and checked by the intake when the subject was prepared)."""
        img = load_nifti(
            path, subject, missing=f"{what} (output grid) does not exist", unreadable=f"cannot read the {what} header"
        )
        header = nib.Nifti1Header.from_header(img.header)
        return cls(str(path), tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64), header)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return canonical_grid(self.shape, self.affine)[0]

    @property
    def canonical_affine(self) -> np.ndarray:
        """The affine of the intake's RAS+ image of this file."""
        return canonical_grid(self.shape, self.affine)[1]

    def from_canonical(self, volume: np.ndarray) -> np.ndarray:
        """Exact inverse of the intake's canonical reorientation (axis flips and permutations only)."""
        return from_canonical(volume, self.affine)

    def image(self, data: np.ndarray) -> nib.Nifti1Image:
        """A float32 image with this file's affine, qform/sform codes and units (no intensity scaling)."""
        data = np.asarray(data, dtype=np.float32)
        if data.shape != self.shape:
            raise ValueError(f"data shape {data.shape} != source shape {self.shape}")
        header = self.header.copy()
        header.set_data_shape(data.shape)
        header.set_data_dtype(np.float32)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"] = header["cal_max"] = 0
        return nib.Nifti1Image(data, self.affine, header=header)


# ----------------------------------------------------------------------------------------------- ANTs ↔ nibabel
def _ants():
    """Import ANTs lazily, with ITK's default of one thread (:func:`m2diff_monai.runtime.default_itk_threads`)
    unless a worker or the user set its count first: every ANTs call of the project comes through here."""
    from m2diff_monai.runtime import default_itk_threads

    default_itk_threads()
    import ants

    return ants


def nib_to_ants(image: nib.Nifti1Image):
    """nibabel (RAS+ affine) → ANTsImage (LPS+ origin/spacing/direction), float32, no file round trip."""
    affine = np.asarray(image.affine, dtype=np.float64)
    linear = _LPS_FROM_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = _LPS_FROM_RAS @ affine[:3, 3]
    data = np.asarray(image.dataobj, dtype=np.float32)
    return _ants().from_numpy(
        data, origin=tuple(float(v) for v in origin), spacing=tuple(float(v) for v in spacing), direction=direction
    )


def ants_to_nib(image) -> nib.Nifti1Image:
    """ANTsImage → float32 nibabel image with the equivalent RAS+ affine (qform and sform set)."""
    linear = np.asarray(image.direction, dtype=np.float64) * np.asarray(image.spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_FROM_RAS @ linear
    affine[:3, 3] = _LPS_FROM_RAS @ np.asarray(image.origin, dtype=np.float64)
    out = nib.Nifti1Image(image.numpy().astype(np.float32), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


# --------------------------------------------------------------------------------------- through the registration
def inverse_flags(inverse_transforms: Sequence[str | Path]) -> list[bool]:
    """THE rule for ANTs' inverse transform list (``ants.registration(...)["invtransforms"]``, stored in
    ``subject.json`` under ``registration.transforms.inverse``): affine ``.mat`` files are inverted, the inverse
    warp fields are already inverses and are used as they are (antspyx's documented ``whichtoinvert``)."""
    return [str(t).endswith(".mat") for t in inverse_transforms]


def apply_ants_transforms(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    to_affine: np.ndarray,
    transforms: Sequence[str | Path],
    invert: Sequence[bool] | None = None,
    order: int = 1,
) -> np.ndarray:
    """``data`` on ``affine`` → the grid ``(shape, to_affine)`` through ANTs transform files (in
    ``ants.apply_transforms`` order; ``invert`` as its ``whichtoinvert``, default: none inverted, stated
    explicitly because antspyx otherwise guesses from the file names), nearest neighbour (``order=0``) or linear
    (``1``); outside the source: 0."""
    ants = _ants()
    flags = [False] * len(transforms) if invert is None else [bool(v) for v in invert]
    fixed = nib.Nifti1Image(np.zeros(tuple(int(s) for s in shape[:3]), dtype=np.float32), to_affine)
    moving = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    out = ants.apply_transforms(
        nib_to_ants(fixed),
        nib_to_ants(moving),
        transformlist=[str(t) for t in transforms],
        whichtoinvert=flags,
        interpolator=ANTS_INTERPOLATORS[int(order)],
    )
    return np.asarray(ants_to_nib(out).dataobj, dtype=np.float32)


def map_back_through_registration(
    data: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    to_affine: np.ndarray,
    inverse_transforms: Sequence[str | Path],
    order: int = 1,
    subject: str | None = None,
) -> np.ndarray:
    """A volume on the registration's fixed grid (the T1 grid of ``--space mri`` cubes) → the moving image's grid
    (the PET grid) through the inverse transforms, with the one rule of :func:`inverse_flags`. Raises
    :class:`InputError` when the transforms are missing (the volume cannot go back without them)."""
    if not inverse_transforms:
        raise InputError(
            "space=mri needs the PET->MRI registration's inverse transforms (subject.json "
            "registration.transforms.inverse) to map the volume back to the PET grid",
            subject=subject,
        )
    missing = [Path(t) for t in inverse_transforms if not Path(t).is_file()]
    if missing:
        raise InputError("registration transform does not exist", subject=subject, path=missing[0])
    return apply_ants_transforms(
        data, affine, shape, to_affine, inverse_transforms, invert=inverse_flags(inverse_transforms), order=order
    )


def stored_inverse_transforms(record: Mapping[str, Any], folder: str | Path) -> list[Path]:
    """The inverse transform files a ``subject.json`` record lists, as paths inside its subject ``folder``."""
    names = ((record.get("registration") or {}).get("transforms") or {}).get("inverse") or []
    return [Path(folder) / str(name) for name in names]
