"""Stage 1 of preprocessing: load every input file with nibabel, check it, and hand on a clean canonical image.

Why nibabel and a full read: SimpleITK and ANTs silently turn NaN/Inf into 0, silently read truncated files (the
missing voxels become 0) and use the qform where nibabel uses the sform. Every file is therefore read completely
here, checked, and returned as an in-memory float32 RAS+ image whose qform and sform are both the affine chosen
below. Later stages must work from these images (or files written from them), never from the raw paths.

Checks and decisions are listed in ``docs/preprocessing-intake.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff_monai.data import grid
from m2diff_monai.errors import InputError
from preprocessing.subjects import SubjectRow

ROLES: tuple[str, ...] = ("ld_pet", "sd_pet", "mri", "mask")
PET_ROLES = frozenset({"ld_pet", "sd_pet"})
ROLE_NAMES = {"ld_pet": "low-dose PET", "sd_pet": "standard-dose PET", "mri": "MRI", "mask": "mask"}
QFORM_POLICIES = ("warn", "reject")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAGIC = b"\x1f\x8b"

# Two affines describe "the same grid" when no corner voxel centre moves by more than this fraction of a voxel.
QFORM_SFORM_TOLERANCE_VOXELS = 0.01
SAME_GRID_TOLERANCE_VOXELS = 0.1
# Assumption: PET reconstructions may hold some negative voxels (FBP, noise); above this share of the positive
# activity a warning is given, and a PET whose negative sum outweighs its positive sum is rejected.
NEGATIVE_WARN_FRACTION = 0.05
PLAUSIBLE_VOXEL_MM = (0.1, 20.0)
# Overlap: the moving image's "object" is its voxels above this fraction of its 99.5th percentile.
OBJECT_THRESHOLD_FRACTION = 0.1


@dataclass(frozen=True)
class IntakeOptions:
    """How to read inputs. ``frame`` is 0-based and applies to 4D PET only (3D files ignore it)."""

    frame: int | None = None
    sum_frames: bool = False
    qform_policy: str = "warn"
    min_overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.frame is not None and self.sum_frames:
            raise ValueError("choose either frame or sum_frames, not both")
        if self.frame is not None and self.frame < 0:
            raise ValueError(f"frame must be >= 0 (0-based), got {self.frame}")
        if self.qform_policy not in QFORM_POLICIES:
            raise ValueError(f"qform_policy must be one of {QFORM_POLICIES}, got {self.qform_policy!r}")
        if not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in [0, 1], got {self.min_overlap}")


def load_volume(
    path: str | Path,
    subject: str,
    role: str,
    options: IntakeOptions = IntakeOptions(),
    warnings_out: list[str] | None = None,
) -> nib.Nifti1Image:
    """Read ``path`` completely, check it, and return a 3D float32 image in canonical RAS+ orientation.

    Raises :class:`InputError` (naming ``subject`` and ``path``) for anything that would make later stages
    wrong; appends one-line warnings (qform ≠ sform under the ``warn`` policy, ...) to ``warnings_out``.
    """
    img, warnings = _load(Path(path), subject, role, options)
    if warnings_out is not None:
        warnings_out.extend(InputError(w, subject=subject, path=path).line() for w in warnings)
    return img


def _load(path: Path, subject: str, role: str, options: IntakeOptions) -> tuple[nib.Nifti1Image, list[str]]:
    """:func:`load_volume` with the warnings returned as bare problems (no subject/file prefix)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    what = ROLE_NAMES[role]
    warnings: list[str] = []

    def fail(problem: str) -> InputError:
        return InputError(f"{what}: {problem}", subject=subject, path=path)

    def warn(problem: str) -> None:
        warnings.append(f"{what}: {problem}")

    _check_file(path, fail)
    try:
        img = nib.load(path, mmap=False)  # a private in-memory copy, never a view of the user's file
    except MemoryError:
        raise
    except Exception as err:  # nibabel raises many types for corrupt headers; all mean "bad file"
        raise fail(f"cannot read the NIfTI header ({_describe(err)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise fail(f"not a single-file NIfTI image (nibabel read it as {type(img).__name__})")

    shape = _spatial_shape(img.shape, role, options, fail)
    affine, source = _choose_affine(img, shape, options.qform_policy, fail, warn)
    data = _read_data(img, shape, options, fail)
    _check_values(data, role, fail, warn)
    zooms = np.asarray(grid.voxel_spacing(affine))
    if zooms.min() < PLAUSIBLE_VOXEL_MM[0] or zooms.max() > PLAUSIBLE_VOXEL_MM[1]:
        warn(f"voxel size {_fmt_zooms(zooms)} mm is implausible for a brain scan (header units wrong?)")
    out = _canonical(data, affine, source)
    sheared = grid.grid_distance(out.header.get_qform(), out.affine, out.shape)
    if sheared > QFORM_SFORM_TOLERANCE_VOXELS * float(zooms.min()):
        warn(
            f"the affine has a shear the qform cannot hold (up to {sheared:.3g} mm): tools that read the qform "
            "(SimpleITK/ANTs) would see a different geometry"
        )
    return out, warnings


def _check_file(path: Path, fail) -> None:
    if not path.exists():
        raise fail("file does not exist")
    if not path.is_file():
        raise fail("not a file")
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES):
        raise fail("not a NIfTI file name (expected .nii or .nii.gz)")
    size = path.stat().st_size
    if size == 0:
        raise fail("file is empty (0 bytes)")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if name.endswith(".gz") and magic != GZIP_MAGIC:
        raise fail("file name ends in .gz but the file is not gzip-compressed (rename it to .nii?)")
    if name.endswith(".nii") and magic == GZIP_MAGIC:
        raise fail("file is gzip-compressed but named .nii (rename it to .nii.gz)")


def _choose_affine(img, shape: tuple[int, ...], policy: str, fail, warn) -> tuple[np.ndarray, str]:
    """The sform when set (nibabel's rule), else the qform; qform ≠ sform follows ``policy``."""
    header = img.header
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if scode > 0:
        affine, source = sform, "sform"
    elif qcode > 0:
        affine, source = qform, "qform"
    else:
        affine, source = img.affine, "header"
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise fail(f"the {source} affine has non-finite entries")
    zooms = np.asarray(grid.voxel_spacing(affine))
    det = abs(np.linalg.det(affine[:3, :3]))
    if zooms.min() == 0 or det < 1e-6 * np.prod(zooms):
        raise fail(f"the {source} affine is singular (voxel sizes {_fmt_zooms(zooms)} mm, determinant {det:.3g})")
    if source == "header":
        warn(
            "neither qform nor sform is set: orientation unknown; assuming nibabel's default "
            f"({''.join(nib.aff2axcodes(affine))}, voxel sizes from pixdim)"
        )
    elif source == "sform" and qcode > 0:
        diff = grid.grid_distance(qform, sform, shape[:3])
        if not np.isfinite(diff) or diff > QFORM_SFORM_TOLERANCE_VOXELS * float(zooms.min()):
            detail = f"they place voxels up to {diff:.3g} mm apart" if np.isfinite(diff) else "the qform is invalid"
            if policy == "reject":
                raise fail(
                    f"qform and sform disagree ({detail}); fix the header, or use --qform-policy warn "
                    "to trust the sform"
                )
            warn(
                f"qform and sform disagree ({detail}); using the sform as nibabel does "
                "(SimpleITK/ANTs would use the qform)"
            )
    return affine, source


def _spatial_shape(shape: tuple[int, ...], role: str, options: IntakeOptions, fail) -> tuple[int, ...]:
    """Shape without trailing singleton dimensions beyond the third; checks the number of dimensions."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise fail(f"image of shape {_fmt_shape(shape)} is not a 3D volume")
    if len(shape) > 4:
        raise fail(f"image has {len(shape)} dimensions (shape {_fmt_shape(shape)}); at most 4 are supported")
    if len(shape) == 4:
        frames = shape[3]
        if role not in PET_ROLES:
            raise fail(f"image is 4D with {frames} volumes (shape {_fmt_shape(shape)}); only PET may be 4D")
        if options.frame is None and not options.sum_frames:
            raise fail(
                f"image is 4D with {frames} frames: pick one with --frame N (0..{frames - 1}) "
                "or add them up with --sum-frames"
            )
        if options.frame is not None and options.frame >= frames:
            raise fail(f"--frame {options.frame} is out of range: the file has {frames} frames (0..{frames - 1})")
    return shape


def _read_data(img, shape: tuple[int, ...], options: IntakeOptions, fail) -> np.ndarray:
    """Read every byte of the image (so truncation is caught), select or sum frames, return float32 3D."""
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError:
        raise
    except Exception as err:
        raise fail(f"cannot read the image data: file is truncated or corrupt ({_describe(err)})") from None
    data = data.reshape(shape)
    if data.ndim == 4:
        if options.sum_frames:
            data = data.sum(axis=3, dtype=np.float64).astype(np.float32)
        else:
            data = np.ascontiguousarray(data[..., options.frame])  # do not keep the other frames alive
    return data


def _check_values(data: np.ndarray, role: str, fail, warn) -> None:
    if not np.isfinite(data).all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        raise fail(f"{n_nan + n_inf} of {data.size} voxels are not finite ({n_nan} NaN, {n_inf} Inf)")
    vmin, vmax = float(data.min()), float(data.max())
    if vmin == 0.0 and vmax == 0.0:
        raise fail("image is empty (every voxel is 0)")
    if role == "mask":
        if not np.all((data == 0) | (data == 1)):
            odd = data[(data != 0) & (data != 1)]
            raise fail(f"mask is not binary ({odd.size} voxels are neither 0 nor 1, e.g. {float(odd[0]):g})")
        return
    if vmin == vmax:
        raise fail(f"image is constant (every voxel is {vmin:g})")
    if role in PET_ROLES and vmin < 0:
        positive = float(data.sum(where=data > 0, dtype=np.float64))
        negative = -float(data.sum(where=data < 0, dtype=np.float64))
        if negative >= positive:
            raise fail(
                f"PET is negative-dominated (negative voxels sum to -{negative:.4g}, positive ones to "
                f"{positive:.4g}): sign or scaling error?"
            )
        if negative > NEGATIVE_WARN_FRACTION * positive:
            warn(f"negative voxels hold {negative / positive:.0%} of the positive activity (min {vmin:.4g})")


def _canonical(data: np.ndarray, affine: np.ndarray, source: str) -> nib.Nifti1Image:
    """RAS+ image whose qform and sform are both the chosen affine, so every later reader agrees."""
    out_data, out_affine = grid.to_canonical(data, affine)
    out = nib.Nifti1Image(out_data, out_affine)
    code = "aligned" if source == "sform" else "scanner"
    out.header.set_qform(out_affine, code=code)
    out.header.set_sform(out_affine, code=code)
    out.header.set_xyzt_units("mm", "sec")
    out.header.set_data_dtype(np.float32)
    return out


# --------------------------------------------------------------------------------------------------- geometry
def _object_points(img: nib.Nifti1Image, stride: int = 2) -> np.ndarray:
    """World coordinates (3, N) of the image's object voxels (above 10 % of its 99.5th percentile, so background
    noise does not count), on a ``stride`` subgrid to stay fast on 256³ volumes."""
    sample = np.asanyarray(img.dataobj)[::stride, ::stride, ::stride]
    positive = sample[sample > 0]
    threshold = OBJECT_THRESHOLD_FRACTION * float(np.percentile(positive, 99.5)) if positive.size else 0.0
    idx = np.argwhere(sample > threshold if threshold > 0 else sample != 0).T.astype(np.float64) * stride
    return img.affine[:3, :3] @ idx + img.affine[:3, 3:4]


def check_overlap(
    fixed: nib.Nifti1Image,
    moving: nib.Nifti1Image,
    subject: str,
    fixed_path: str | Path,
    moving_path: str | Path,
    min_fraction: float = 0.5,
) -> float:
    """Fraction of the moving image's object voxels (above 10 % of its 99.5th percentile) whose world position lies
    inside the fixed image's field of view. Exact for oblique grids, unlike comparing axis-aligned boxes.

    Raises :class:`InputError` (on ``moving_path``) below ``min_fraction``: the files then do not share a world
    coordinate system, and registration, which starts from the headers, would fail or align the wrong structures.
    """
    points = _object_points(moving)
    shape = np.asarray(fixed.shape[:3], dtype=np.float64).reshape(3, 1)
    if points.shape[1] == 0:
        fraction = 0.0
    else:
        inverse = np.linalg.inv(fixed.affine)
        ijk = inverse[:3, :3] @ points + inverse[:3, 3:4]
        inside = np.all((ijk >= -0.5) & (ijk <= shape - 0.5), axis=0)
        fraction = float(inside.mean())
    if fraction < min_fraction:
        fov_centre = fixed.affine[:3, :3] @ ((shape - 1) / 2) + fixed.affine[:3, 3:4]
        offset = (points.mean(axis=1, keepdims=True) - fov_centre).ravel() if points.shape[1] else np.zeros(3)
        raise InputError(
            f"PET and MRI do not overlap in world space: {fraction:.1%} of this image's object lies inside the "
            f"field of view of {fixed_path} (need {min_fraction:.0%}; its centre is offset by "
            f"({', '.join(f'{v:.0f}' for v in offset)}) mm); the files do not share a coordinate system - "
            "align their headers first",
            subject=subject,
            path=moving_path,
        )
    return fraction


# ---------------------------------------------------------------------------------------------------- subject
@dataclass
class LoadedSubject:
    row: SubjectRow
    ld_pet: nib.Nifti1Image | None
    sd_pet: nib.Nifti1Image | None
    mri: nib.Nifti1Image | None
    masks: dict[str, nib.Nifti1Image] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def load_subject(row: SubjectRow, options: IntakeOptions = IntakeOptions()) -> LoadedSubject:
    """Load and check every file of ``row`` and the checks across files; raise the first :class:`InputError`."""
    warnings: list[str] = []
    images = {
        role: load_volume(path, row.subject_id, role, options, warnings)
        for role, path in (("ld_pet", row.ld_pet), ("sd_pet", row.sd_pet), ("mri", row.mri))
        if path
    }
    masks = {name: load_volume(path, row.subject_id, "mask", options, warnings) for name, path in row.masks.items()}
    errors, _ = _cross_check(row, images, masks, options)
    if errors:
        raise errors[0]
    return LoadedSubject(row, images.get("ld_pet"), images.get("sd_pet"), images.get("mri"), masks, warnings)


def _same_grid(a: nib.Nifti1Image, b: nib.Nifti1Image) -> str | None:
    """None when ``b`` is on ``a``'s grid, else why not."""
    if a.shape[:3] != b.shape[:3]:
        return f"shape {_fmt_shape(b.shape)} differs from {_fmt_shape(a.shape)}"
    dist = grid.grid_distance(a.affine, b.affine, a.shape)
    if dist > SAME_GRID_TOLERANCE_VOXELS * min(grid.voxel_spacing(a.affine)):
        return f"affines differ (voxels up to {dist:.3g} mm apart)"
    return None


def _cross_check(
    row: SubjectRow, images: dict[str, nib.Nifti1Image], masks: dict[str, nib.Nifti1Image], options: IntakeOptions
) -> tuple[list[InputError], list[str]]:
    """Checks across the files of one subject: (errors, descriptions of the checks that passed)."""
    sid = row.subject_id
    errors: list[InputError] = []
    passed: list[str] = []
    if "ld_pet" in images and "sd_pet" in images:
        why = _same_grid(images["ld_pet"], images["sd_pet"])
        if why:
            errors.append(
                InputError(
                    f"standard-dose PET is not on the low-dose PET's grid ({row.ld_pet}): {why}",
                    subject=sid,
                    path=row.sd_pet,
                )
            )
        else:
            passed.append("LD/SD PET on one grid")
    pet_role = "ld_pet" if "ld_pet" in images else "sd_pet" if "sd_pet" in images else None
    pet_path = getattr(row, pet_role) if pet_role else None
    if pet_role and "mri" in images:
        try:
            frac = check_overlap(images["mri"], images[pet_role], sid, row.mri, pet_path, options.min_overlap)
            passed.append(f"PET-MRI overlap {frac:.0%}")
        except InputError as err:
            errors.append(err)
    for name, mask in masks.items():
        if pet_role is None:
            errors.append(
                InputError(
                    f"mask {name} needs a PET (ld_pet or sd_pet) to define its grid", subject=sid, path=row.masks[name]
                )
            )
            continue
        why = _same_grid(images[pet_role], mask)
        if why:
            errors.append(
                InputError(f"mask {name} is not on the PET grid ({pet_path}): {why}", subject=sid, path=row.masks[name])
            )
        else:
            passed.append(f"mask {name} on the PET grid")
    return errors, passed


@dataclass(frozen=True)
class Finding:
    subject: str
    file: str
    level: str  # "ok" | "warning" | "error"
    message: str


def validate_subjects(rows: Sequence[SubjectRow], options: IntakeOptions = IntakeOptions()) -> list[Finding]:
    """Check every file of every subject and report, without raising for per-subject problems.

    One finding per file (``ok``, ``warning`` or ``error``), plus one per subject for the checks across its files
    (``file`` empty when they all pass, else the file each failure names).
    """
    findings: list[Finding] = []
    for row in rows:
        sid = row.subject_id
        images: dict[str, nib.Nifti1Image] = {}
        masks: dict[str, nib.Nifti1Image] = {}
        failed = False
        for key, path in row.files().items():
            role = "mask" if key.startswith("mask_") else key
            try:
                img, warnings = _load(path, sid, role, options)
            except InputError as err:
                findings.append(Finding(sid, str(path), "error", err.problem))
                failed = True
                continue
            if role == "mask":
                masks[key[len("mask_") :]] = img
            else:
                images[role] = img
            if warnings:
                findings.append(Finding(sid, str(path), "warning", "; ".join(warnings)))
            else:
                findings.append(Finding(sid, str(path), "ok", _describe_image(img, path)))
        if failed:
            continue
        errors, passed = _cross_check(row, images, masks, options)
        for err in errors:
            findings.append(Finding(sid, err.path or "", "error", err.problem))
        if not errors and passed:
            findings.append(Finding(sid, "", "ok", "; ".join(passed)))
    return findings


def _describe_image(img: nib.Nifti1Image, path: Path) -> str:
    try:
        source = "".join(nib.aff2axcodes(nib.load(path).affine))
    except Exception:  # the file was just read successfully; the description is best-effort only
        source = "?"
    return f"{_fmt_shape(img.shape)} voxels of {_fmt_zooms(img.header.get_zooms()[:3])} mm, stored {source}"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _fmt_zooms(zooms: Sequence[float]) -> str:
    return "x".join(f"{float(z):.3g}" for z in zooms)


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
