"""Stage 2: bring the T1 and the PET onto one grid with ANTs (antspyx), and measure how well they agree.

Default (``space="pet"``): the T1 is registered to the PET (SD PET when present, it has far less noise than a
DRF-100 LD PET; else the LD PET) and resampled on the PET grid, so the PET voxels are never interpolated.
``space="mri"`` (MFdiff-style data) registers the PET to the T1 and resamples the PET onto the T1 grid.

Images travel between nibabel and ANTs in memory (:func:`m2diff_monai.data.grid.nib_to_ants`: RAS+ ↔ LPS+).
Files are validated by nibabel first (intake): ANTs silently turns NaN into 0 and reads truncated files, so it
never reads a user file here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from m2diff_monai.data.grid import _ants, ants_to_nib, apply_ants_transforms, nib_to_ants

TRANSFORMS: dict[str, str] = {"syn": "SyN", "affine": "Affine", "rigid": "Rigid"}
SPACES: tuple[str, ...] = ("pet", "mri")


def normalize_transform_name(name: str) -> str:
    """``SyN``/``affine``/``rigid`` (any case) → the ANTs ``type_of_transform`` name."""
    try:
        return TRANSFORMS[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown transform {name!r}; choose from SyN, affine, rigid") from None


def normalized_mutual_information(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 64
) -> float:
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


@contextlib.contextmanager
def ants_seed(ants, seed: int) -> Iterator[None]:
    """ANTs' ``--random-seed`` for the calls inside, restored afterwards.

    Why not ``ants.registration(random_seed=...)``: antspyx 0.6.3 swallows that keyword in ``**kwargs`` and
    passes a seed only from ``ants.config._random_seed`` (set by ``ants.set_ants_deterministic``, which would also
    refuse every transform type but the ``*Repro`` ones, whose linear stages use correlation, not MI, a poor metric
    between a T1 and a PET). So the seed goes through that module attribute; ``pyproject.toml`` pins antspyx.
    ANTs reads ``--random-seed 0`` as "seed from the clock", so our seed ``s >= 0`` is passed as ``s + 1``.
    """
    if int(seed) < 0:
        raise ValueError(f"the registration seed must be >= 0, got {seed}")
    previous = ants.config._random_seed
    ants.config._random_seed = int(seed) + 1
    try:
        yield
    finally:
        ants.config._random_seed = previous


def register(
    fixed: nib.Nifti1Image, moving: nib.Nifti1Image, transform: str = "SyN", seed: int = 0
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with mutual information (Mattes) and resample it on the fixed grid.

    Rigid and Affine run ANTs' multi-resolution linear stages; SyN adds the symmetric-normalisation
    deformable stage (the paper's choice), also driven by Mattes MI because T1 and PET contrasts differ.
    ``seed`` fixes ANTs' random metric sampling (:func:`ants_seed`). With one ITK thread the result is then
    identical bit for bit on every rerun; with more threads reruns differ
    (demo-001 at 4 mm, rigid: up to 55 of a 950 maximum with 2 threads, 0 with 1). ANTs is loaded with one ITK
    thread unless ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` says otherwise (``runtime.default_itk_threads``).
    """
    ants = _ants()
    kind = normalize_transform_name(transform)
    start = time.perf_counter()
    fixed_a = nib_to_ants(fixed)
    moving_a = nib_to_ants(moving)
    workdir = tempfile.mkdtemp(prefix="m2diff-reg-")
    before_a = ants.resample_image_to_target(moving_a, fixed_a, interp_type="linear")
    with ants_seed(ants, seed):
        result = ants.registration(
            fixed_a,
            moving_a,
            type_of_transform=kind,
            aff_metric="mattes",
            syn_metric="mattes",
            outprefix=os.path.join(workdir, "reg_"),
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
    order = {"nearestNeighbor": 0, "linear": 1}[interpolator]
    data = apply_ants_transforms(
        np.asarray(moving.dataobj, dtype=np.float32),
        moving.affine,
        fixed.shape[:3],
        fixed.affine,
        transforms,
        order=order,
    )
    out = nib.Nifti1Image(data, np.asarray(fixed.affine, dtype=np.float64))
    out.set_qform(fixed.affine, code=1)
    out.set_sform(fixed.affine, code=1)
    return out


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


@dataclass
class CubeGridImages:
    """One subject's images on the grid its cubes are cut from (the PET grid for ``space="pet"``, the T1 grid for
    ``space="mri"``), and the registration that put them there."""

    affine: np.ndarray
    pets: dict[str, np.ndarray]  # the ``pets`` given, by the same keys
    mri: np.ndarray | None
    masks: dict[str, np.ndarray]  # bool
    registration: RegistrationResult | None  # None without a T1; the caller keeps its files, then cleanup()
    moving: str = ""  # what was registered onto what (for subject.json)
    fixed: str = ""


def register_to_cube_grid(
    pets: dict[str, nib.Nifti1Image],
    mri: nib.Nifti1Image | None,
    reference: str,
    space: str = "pet",
    transform: str = "SyN",
    seed: int = 0,
    masks: dict[str, np.ndarray] | None = None,
) -> CubeGridImages:
    """The registration step training and inference share: bring the T1 and the PET onto the cube grid.

    ``pets``: PET images on one grid (``ld_pet``, optionally ``sd_pet``); ``masks``: boolean arrays on that grid.
    ``reference``: the key of the PET the T1 is registered with. It differs by caller ON PURPOSE: training passes
    ``"sd_pet"`` when the subject has one (far less noise than a low-dose PET, so a steadier mutual information),
    inference passes ``"ld_pet"`` (a new scan has no standard-dose PET). ``space="pet"``: T1 → reference, the T1
    resampled on the PET grid, PET voxels untouched. ``space="mri"``: reference → T1, and every other PET and mask
    follows through the same forward transforms (masks nearest neighbour).
    """
    if reference not in pets:
        raise ValueError(f"reference {reference!r} is not one of the PET images {sorted(pets)}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    masks = dict(masks or {})
    pet_grid = pets[reference]
    arrays = {key: np.asarray(img.dataobj, dtype=np.float32) for key, img in pets.items()}
    if space == "pet":
        if mri is None:
            return CubeGridImages(np.asarray(pet_grid.affine, dtype=np.float64), arrays, None, masks, None)
        reg = register(pet_grid, mri, transform, seed=seed)
        return CubeGridImages(
            np.asarray(pet_grid.affine, dtype=np.float64),
            arrays,
            np.asarray(reg.warped.dataobj, dtype=np.float32),
            masks,
            reg,
            moving="mri",
            fixed=reference,
        )
    if mri is None:
        raise ValueError("space='mri' needs a T1 to define the cube grid")
    reg = register(mri, pet_grid, transform, seed=seed)
    try:
        moved = {
            key: (
                np.asarray(reg.warped.dataobj, dtype=np.float32)
                if key == reference
                else np.asarray(apply_transforms(mri, img, reg.fwd_transforms).dataobj, dtype=np.float32)
            )
            for key, img in pets.items()
        }
        moved_masks = {
            name: np.asarray(
                apply_transforms(
                    mri,
                    nib.Nifti1Image(m.astype(np.float32), pet_grid.affine),
                    reg.fwd_transforms,
                    interpolator="nearestNeighbor",
                ).dataobj
            )
            > 0.5
            for name, m in masks.items()
        }
    except BaseException:
        reg.cleanup()
        raise
    return CubeGridImages(
        np.asarray(mri.affine, dtype=np.float64),
        moved,
        np.asarray(mri.dataobj, dtype=np.float32),
        moved_masks,
        reg,
        moving=reference,
        fixed="mri",
    )
