"""One subject in memory, prepared exactly as the training data were, and the way back to its own grid.

Why a module here: ``preprocessing.subject_build.process_subject`` writes a whole subject folder (slices, QC, ANTs
transforms) and needs an SD PET for its mask; inference needs the normalized cube, the brain mask, the LD scaling
and the crop geometry in memory, for a subject with only an LD PET (and maybe a T1). This module composes the
pipeline's stage functions (intake, registration, mask, normalization, crop) in the pipeline's order; it does not
reimplement any of them, so a change to a stage changes training and inference alike.

Differences from the training pipeline, by necessity:
- the registration's PET and the brain mask come from the LD PET (the pipeline prefers the SD PET when it has one:
  less noise; inference has none), through the same :func:`preprocessing.registration.register_to_cube_grid`;
  with ``shared`` normalization the scale is the LD PET's 99.5th percentile inside that mask either way.
- ``slice`` normalization: the cube holds the ``shared`` scaling; the per-slice min–max of each orientation's
  slices happens in :func:`m2diff_monai.inference.volume.predict_orientation`, which also maps every predicted
  slice back with its LD slice's min/max before the orientations are fused.
- voxel size: the scan is first resampled to the spacing the model was trained at (``preprocessing.spacing``:
  the checkpoint's ``config.data.preprocessing.spacing``; absent in older checkpoints = no resampling), so the
  network sees anatomy at its trained scale whatever the scanner's voxel size.
- ``space="mri"``: the PET → T1 registration result is kept (in a temporary folder) so the prediction can go back
  through the inverse transform (:func:`m2diff_monai.data.grid.map_back_through_registration`); that step
  interpolates (linear), unlike ``space="pet"``, which is exact.

The way back (:meth:`PreparedSubject.to_source`, every step :mod:`m2diff_monai.data.grid`): uncrop the cube onto the
canonical grid (exact placement), resample it onto the LD PET's own voxel size when the model's spacing differs
(trilinear), then undo the canonical reorientation (a flip/permutation of axes: exact) and save with the input
file's own affine and header, so LPS-stored and oblique inputs get a prediction of the same shape, affine and voxel
order.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from m2diff_monai.data import grid
from m2diff_monai.data.grid import SourceGrid
from m2diff_monai.data.manifest import (
    item_path,
    manifest_provenance,
    provenance_parameters,
    read_subject_record,
    subject_record_path,
)
from m2diff_monai.errors import InputError
from preprocessing import crop as crop_stage
from preprocessing import spacing as spacing_stage
from preprocessing.cubes import prepare_cubes
from preprocessing.intake import IntakeOptions, load_subject
from preprocessing.normalization import Scaling, recorded_method
from preprocessing.registration import SPACES, normalize_transform_name, register_to_cube_grid
from preprocessing.subjects import SubjectRow

PIPELINE_DEFAULTS: dict[str, Any] = {"normalization": "shared", "transform": "SyN", "space": "pet"}


# ------------------------------------------------------------------------------------------- training settings
@dataclass(frozen=True)
class TrainingPreprocessing:
    """The preprocessing parameters a model was trained with, and where each came from (for the log/report)."""

    size: int
    normalization: str = "shared"
    transform: str = "SyN"
    space: str = "pet"
    spatial_size: int | None = None  # per-slice centred pad/crop of the training transforms (None: none)
    seed: int = 0
    spacing: tuple[float, float, float] | None = None  # voxel size (mm, RAS axes) of the cubes; None: native
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", crop_stage.validate_size(self.size))
        object.__setattr__(self, "normalization", recorded_method(self.normalization))  # legacy "paper" → "volume"
        object.__setattr__(self, "spacing", spacing_stage.recorded_spacing(self.spacing))
        object.__setattr__(self, "transform", normalize_transform_name(self.transform))
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "normalization": self.normalization,
            "transform": self.transform,
            "space": self.space,
            "spatial_size": self.spatial_size,
            "spacing": None if self.spacing is None else list(self.spacing),
            "sources": dict(self.sources),
        }


def _manifest_parameters(data_config: dict[str, Any]) -> dict[str, Any]:
    """``provenance.parameters`` of the training manifest named in the checkpoint, when it can still be read
    (as recorded: absolute, or relative to the working folder, like every path the tools take)."""
    name = data_config.get("manifest")
    if not name:
        return {}
    path = Path(str(name))
    if not path.is_file():
        return {}
    content = manifest_provenance(path) or {}
    params = provenance_parameters(path)
    for key in ("size", "space"):
        if key not in params and key in content:
            params[key] = content[key]
    return params


def resolve_preprocessing(
    data_config: dict[str, Any] | None,
    overrides: dict[str, Any] | None = None,
    network_image_size: int | None = None,
) -> TrainingPreprocessing:
    """Per parameter: explicit ``overrides`` → the checkpoint's ``config["data"]`` (flat keys or a nested
    ``"preprocessing"`` dict) → the training manifest's provenance → defaults (cube size = the network's
    ``image_size``; the pipeline's defaults otherwise; spacing: none recorded = the scan's own voxel size, as
    checkpoints and manifests from before ``--spacing`` were made)."""
    data_config = dict(data_config or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    nested = dict(data_config.get("preprocessing") or {})
    manifest = _manifest_parameters(data_config)
    for table in (nested, manifest):  # a recorded null spacing is a decision (native), not a missing record
        if "spacing" in table and table["spacing"] is None:
            table["spacing"] = spacing_stage.NATIVE
    defaults = {**PIPELINE_DEFAULTS, "size": network_image_size or 256, "seed": 0, "spacing": "native"}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in ("size", "normalization", "transform", "space", "seed", "spacing"):
        for source, table in (
            ("option", overrides),
            ("checkpoint", nested),
            ("checkpoint", data_config),
            ("manifest provenance", manifest),
            ("default", defaults),
        ):
            if table.get(key) is not None:
                values[key], sources[key] = table[key], source
                break
    spatial = overrides.get("spatial_size", data_config.get("spatial_size"))
    if isinstance(spatial, (list, tuple)):
        spatial = int(spatial[0]) if spatial else None
    values["spatial_size"] = None if spatial in (None, "", 0) else int(spatial)
    try:
        return TrainingPreprocessing(**values, sources=sources)
    except ValueError as err:
        raise InputError(f"preprocessing settings: {err}") from None


# ------------------------------------------------------------------------------------------- the way back
@dataclass
class PreparedSubject:
    """A subject on the training grid: normalized cubes, mask, and everything needed to go back."""

    subject: str
    ld: np.ndarray  # normalized LD PET cube (size³, canonical)
    mri: np.ndarray | None  # normalized, registered T1 cube, or None
    mask: np.ndarray  # bool cube
    scaling: Scaling  # original = normalized * scale + offset (the LD PET's)
    box: crop_stage.CropBox
    cube_affine: np.ndarray
    grid_shape: tuple[int, int, int]  # canonical grid the cube was cut from (PET grid, or T1 grid for space=mri)
    grid_affine: np.ndarray
    source: SourceGrid
    space: str = "pet"
    inverse_transforms: list[str] = field(default_factory=list)  # space=mri: ANTs' inverse list (grid.inverse_flags)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _workdir: str = ""

    def to_source(self, cube: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """A cube on the training grid (normalized or not) → an array on the input LD PET's own grid."""
        canonical = crop_stage.uncrop(np.asarray(cube, dtype=np.float32), self.box, self.grid_shape, fill=fill)
        pet_shape, pet_affine = self.source.canonical_shape, self.source.canonical_affine
        if self.space == "mri":  # the T1 grid: back through the inverse PET→T1 registration (linear)
            canonical = grid.map_back_through_registration(
                canonical,
                self.grid_affine,
                pet_shape,
                pet_affine,
                self.inverse_transforms,
                order=1,
                subject=self.subject,
            )
        else:  # the PET grid itself (exact), or the PET grid resampled to the model's spacing (trilinear)
            canonical = grid.to_grid(canonical, self.grid_affine, pet_shape, pet_affine, order=1, mode="nearest")
        if canonical.shape != self.source.canonical_shape:
            raise ValueError(f"internal: canonical shape {canonical.shape} != {self.source.canonical_shape}")
        return self.source.from_canonical(canonical)

    def denormalize(self, normalized: np.ndarray) -> np.ndarray:
        return self.scaling.invert(normalized)

    def cleanup(self) -> None:
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = ""


# ------------------------------------------------------------------------------------------- raw input
def prepare_subject(
    ld_pet: str | Path,
    mri: str | Path | None,
    settings: TrainingPreprocessing,
    subject: str = "subject",
    intake: IntakeOptions = IntakeOptions(),
) -> PreparedSubject:
    """Validate and preprocess raw NIfTI files the way ``m2diff-preprocess run`` prepared the training data.

    Stages, in the pipeline's order: intake (nibabel, full read, canonical RAS+; PET–MRI overlap check) →
    resampling to ``settings.spacing`` (the PET grid, or the T1 grid for ``space="mri"``) → registration with
    ``settings.transform`` (T1 → LD PET for ``space="pet"``, the reverse for ``"mri"``:
    :func:`preprocessing.registration.register_to_cube_grid`) → brain mask → normalization → crop/pad to the
    ``settings.size`` cube. Raises :class:`InputError` naming the subject and file.
    """
    row = SubjectRow(subject_id=subject, ld_pet=Path(ld_pet), sd_pet=None, mri=None if mri is None else Path(mri))
    loaded = load_subject(row, intake)
    source = SourceGrid.from_file(ld_pet, subject)
    ld_img = loaded.ld_pet
    if ld_img.shape[:3] != source.canonical_shape or not np.allclose(ld_img.affine, source.canonical_affine, atol=1e-4):
        raise InputError(
            "internal: the intake's canonical grid does not match the file's header", subject=subject, path=ld_pet
        )
    loaded, resampling = spacing_stage.resample_subject(loaded, settings.spacing, settings.space)
    ld_img = loaded.ld_pet
    info: dict[str, Any] = {"resampling": resampling}
    workdir = ""
    inverse: list[str] = []
    if settings.space == "mri" and loaded.mri is None:
        raise InputError(
            "this model was trained in MRI space (space=mri) and needs an MRI (--mri)", subject=subject, path=ld_pet
        )
    # the LD PET is the registration's PET here: a new scan has no SD PET (training uses the SD PET when it can)
    aligned = register_to_cube_grid(
        {"ld_pet": ld_img}, loaded.mri, "ld_pet", settings.space, settings.transform, seed=settings.seed
    )
    reg = aligned.registration
    if reg is not None:
        info["registration"] = {
            "transform": reg.transform,
            "similarity": reg.similarity,
            "seconds": round(reg.seconds, 3),
        }
        if settings.space == "mri":  # the inverse transforms map the prediction back: kept until cleanup()
            workdir, inverse = reg.workdir, [str(t) for t in reg.inv_transforms]
        else:
            reg.cleanup()
    ld, affine, mri_data = aligned.pets["ld_pet"], aligned.affine, aligned.mri
    try:
        cubes = prepare_cubes(
            ld,
            affine,
            mri=mri_data,
            normalization=settings.normalization,
            size=settings.size,
            subject=subject,
            path=str(ld_pet),
        )
        return PreparedSubject(
            subject=subject,
            ld=cubes.ld,
            mri=cubes.mri,
            mask=cubes.mask,
            scaling=cubes.ld_scaling,
            box=cubes.box,
            cube_affine=cubes.cube_affine,
            grid_shape=tuple(int(s) for s in cubes.grid_mask.shape),
            grid_affine=np.asarray(affine, dtype=np.float64),
            source=source,
            space=settings.space,
            inverse_transforms=inverse,
            warnings=list(loaded.warnings),
            info=info,
            _workdir=workdir,
        )
    except BaseException:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- manifest items
def prepare_from_manifest_item(item: dict[str, Any], manifest_dir: str | Path) -> PreparedSubject:
    """A manifest ``volumes`` item: its preprocessed cubes (already normalized and cropped) and the geometry in
    its ``subject.json`` that maps the cube back onto ``source_ld_pet``'s grid."""
    base = Path(manifest_dir)
    sid = str(item.get("subject", "?"))

    record_path = subject_record_path(item, base)
    record = read_subject_record(item, base, sid, required=True)

    def cube(key: str, dtype=np.float32) -> np.ndarray:
        path = item_path(base, item.get(key))
        if path is None:
            raise InputError(f"manifest volume item has no '{key}'", subject=sid)
        try:
            return np.asarray(nib.load(str(path)).dataobj, dtype=dtype)
        except FileNotFoundError:
            raise InputError(f"preprocessed {key} does not exist", subject=sid, path=path) from None
        except Exception as err:
            raise InputError(
                f"cannot read preprocessed {key} ({type(err).__name__}: {err})", subject=sid, path=path
            ) from None

    ld = cube("ld_pet")
    mri = cube("mri") if int(item.get("mri_available", 0)) and item.get("mri") else None
    mask = cube("brain_mask") > 0.5
    source_path = item_path(base, item.get("source_ld_pet"))
    if source_path is None:
        raise InputError(
            "manifest volume item has no 'source_ld_pet' (the grid to write the prediction on)", subject=sid
        )
    source = SourceGrid.from_file(source_path, sid)
    crop = record.get("crop") or {}
    box = crop_stage.CropBox(start=tuple(int(s) for s in crop["start"]), size=int(crop["size"]))
    space = str(record.get("space", item.get("space", "pet")))
    inverse: list[str] = []
    if space == "mri":
        folder = item_path(base, item.get("preprocessed_dir")) or Path(record_path).parent
        inverse = [str(t) for t in grid.stored_inverse_transforms(record, folder)]
    grid_shape = tuple(int(s) for s in record.get("grid_shape", source.canonical_shape))
    grid_affine = np.asarray(record.get("grid_affine", source.canonical_affine), dtype=np.float64)
    if ld.shape != (box.size,) * 3:
        raise InputError(
            f"preprocessed LD PET has shape {ld.shape}, expected the {box.size}^3 cube of subject.json",
            subject=sid,
            path=item_path(base, item.get("ld_pet")),
        )
    return PreparedSubject(
        subject=sid,
        ld=ld,
        mri=mri,
        mask=mask,
        scaling=Scaling(scale=float(item["scale"]), offset=float(item.get("offset", 0.0))),
        box=box,
        cube_affine=np.asarray(record.get("affine", crop_stage.cropped_affine(grid_affine, box)), dtype=np.float64),
        grid_shape=grid_shape,
        grid_affine=grid_affine,
        source=source,
        space=space,
        inverse_transforms=inverse,
        info={"preprocessed_dir": str(item_path(base, item.get("preprocessed_dir")) or "")},
    )


def prepare_cohort_item(
    item: dict[str, Any], manifest_dir: str | Path, settings: TrainingPreprocessing
) -> PreparedSubject:
    """Cohort mode: the item's preprocessed cubes when they are at the model's spacing (or the model records
    none); else the item's source files prepared like a new scan (resampled to the model's spacing), so a model
    never sees cubes at another voxel size than it was trained at."""
    prepared = prepare_from_manifest_item(item, manifest_dir)
    if spacing_stage.same_spacing(prepared.cube_affine, settings.spacing):
        return prepared
    sid = prepared.subject
    cube_mm = "x".join(f"{v:.3g}" for v in grid.voxel_spacing(prepared.cube_affine))
    model_mm = "x".join(f"{v:.3g}" for v in settings.spacing)
    mri = item_path(manifest_dir, item.get("source_mri"))
    if mri is not None and not mri.is_file():
        mri = None
    fresh = prepare_subject(prepared.source.path, mri, settings, sid)
    fresh.warnings.append(
        f"subject {sid}: the manifest's cubes are at {cube_mm} mm but the model was trained at "
        f"{model_mm} mm; prepared from the source files instead (LD-PET brain mask)"
    )
    return fresh
