"""Stage 2: bring the T1 and the PET onto one grid with ANTs (antspyx), and measure how well they agree.

Default (``space="pet"``): the T1 is registered to the PET (SD PET when present, it has far less noise than a
DRF-100 LD PET; else the LD PET) and resampled on the PET grid, so the PET voxels are never interpolated.
``space="mri"`` (MFdiff-style data) registers the PET to the T1 and resamples the PET onto the T1 grid.

Images travel between nibabel and ANTs in memory. nibabel affines map voxel indices to RAS+ millimetres while
ITK/ANTs use LPS+: the conversion flips the sign of the first two world axes (``diag(-1, -1, 1)``) and splits the
3x3 part into spacing (column norms) and direction (unit columns). Files are validated by nibabel first
(intake): ANTs silently turns NaN into 0 and reads truncated files, so it never reads a user file here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

TRANSFORMS: dict[str, str] = {"syn": "SyN", "affine": "Affine", "rigid": "Rigid"}
SPACES: tuple[str, ...] = ("pet", "mri")
_LPS = np.diag([-1.0, -1.0, 1.0])


def _ants():
    """Import ANTs lazily: worker processes set their ITK thread count before the first import."""
    import ants

    return ants


def normalize_transform_name(name: str) -> str:
    """``SyN``/``affine``/``rigid`` (any case) → the ANTs ``type_of_transform`` name."""
    try:
        return TRANSFORMS[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; choose from SyN, affine, rigid") from None


def nib_to_ants(image: nib.Nifti1Image):
    """nibabel (RAS+ affine) → ANTsImage (LPS+ origin/spacing/direction), float32, no file round trip."""
    ants = _ants()
    affine = image.affine.astype(np.float64)
    linear = _LPS @ affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = _LPS @ affine[:3, 3]
    data = np.asarray(image.dataobj, dtype=np.float32)
    return ants.from_numpy(
        data, origin=tuple(float(v) for v in origin), spacing=tuple(float(v) for v in spacing), direction=direction
    )


def ants_to_nib(image) -> nib.Nifti1Image:
    """ANTsImage → float32 nibabel image with the equivalent RAS+ affine."""
    linear = np.asarray(image.direction, dtype=np.float64) * np.asarray(image.spacing, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ linear
    affine[:3, 3] = _LPS @ np.asarray(image.origin, dtype=np.float64)
    out = nib.Nifti1Image(image.numpy().astype(np.float32), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def normalized_mutual_information(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 64) -> float:
    """Studholme's NMI = (H(A) + H(B)) / H(A, B), in [1, 2]; higher means better aligned.

    Written here (a joint histogram is a few lines of numpy) because ANTs only exposes Mattes MI, whose value
    depends on its sampling and has no fixed range.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    else:
        a, b = a.ravel(), b.ravel()
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    p = joint / max(joint.sum(), 1.0)

    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    h_joint = entropy(p.ravel())
    return (entropy(p.sum(axis=1)) + entropy(p.sum(axis=0))) / h_joint if h_joint > 0 else 1.0


def _foreground(volume: np.ndarray) -> np.ndarray:
    """Voxels worth comparing: above 5 % of the robust maximum, so empty background does not dominate NMI."""
    positive = volume[volume > 0]
    if positive.size == 0:
        return np.ones(volume.shape, dtype=bool)
    return volume > 0.05 * float(np.percentile(positive, 99.5))


@dataclass
class RegistrationResult:
    """What the pipeline keeps: the moving image on the fixed grid, the transforms, and similarity numbers."""

    warped: nib.Nifti1Image
    fwd_transforms: list[str]  # files mapping moving → fixed (``ants.apply_transforms`` order)
    inv_transforms: list[str]
    similarity: dict[str, dict[str, float]]
    seconds: float
    transform: str
    workdir: str = field(repr=False, default="")

    def cleanup(self) -> None:
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def register(
    fixed: nib.Nifti1Image, moving: nib.Nifti1Image, transform: str = "SyN", seed: int = 0
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with mutual information (Mattes) and resample it on the fixed grid.

    Rigid and Affine run ANTs' multi-resolution linear stages; SyN adds the symmetric-normalisation
    deformable stage (the paper's choice), also driven by Mattes MI because T1 and PET contrasts differ.
    ``seed`` fixes ANTs' random metric sampling so reruns give the same result.
    """
    ants = _ants()
    kind = normalize_transform_name(transform)
    start = time.perf_counter()
    fixed_a = nib_to_ants(fixed)
    moving_a = nib_to_ants(moving)
    workdir = tempfile.mkdtemp(prefix="m2diff-reg-")
    before_a = ants.resample_image_to_target(moving_a, fixed_a, interp_type="linear")
    result = ants.registration(
        fixed_a,
        moving_a,
        type_of_transform=kind,
        aff_metric="mattes",
        syn_metric="mattes",
        outprefix=os.path.join(workdir, "reg_"),
        random_seed=int(seed),
    )
    warped_a = result["warpedmovout"]
    fixed_np = fixed_a.numpy()
    compare = _foreground(fixed_np)
    similarity = {
        # ANTs returns the MI *cost* (negative); we store -cost so that higher means better for both numbers.
        "mattes_mi": {
            "before": -float(ants.image_similarity(fixed_a, before_a, metric_type="MattesMutualInformation")),
            "after": -float(ants.image_similarity(fixed_a, warped_a, metric_type="MattesMutualInformation")),
        },
        "nmi": {
            "before": normalized_mutual_information(fixed_np, before_a.numpy(), compare),
            "after": normalized_mutual_information(fixed_np, warped_a.numpy(), compare),
        },
    }
    return RegistrationResult(
        warped=ants_to_nib(warped_a),
        fwd_transforms=list(result["fwdtransforms"]),
        inv_transforms=list(result["invtransforms"]),
        similarity=similarity,
        seconds=time.perf_counter() - start,
        transform=kind,
        workdir=workdir,
    )


def apply_transforms(
    fixed: nib.Nifti1Image, moving: nib.Nifti1Image, transforms: list[str], interpolator: str = "linear"
) -> nib.Nifti1Image:
    """Resample another image that lives on the moving grid (LD PET, a region mask) with the same transforms."""
    ants = _ants()
    out = ants.apply_transforms(nib_to_ants(fixed), nib_to_ants(moving), transformlist=transforms, interpolator=interpolator)
    return ants_to_nib(out)


def keep_transforms(result: RegistrationResult, folder: Path, prefix: str) -> dict[str, list[str]]:
    """Copy the transform files into ``folder`` under stable names; return their names (relative to folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    kept: dict[str, list[str]] = {"forward": [], "inverse": []}
    names: dict[str, str] = {}
    for key, files in (("forward", result.fwd_transforms), ("inverse", result.inv_transforms)):
        for src in files:
            if src not in names:
                base = os.path.basename(src)
                stem = base[len("reg_") :] if base.startswith("reg_") else base
                names[src] = f"{prefix}_{stem}"
                shutil.copyfile(src, folder / names[src])
            kept[key].append(names[src])
    return kept
