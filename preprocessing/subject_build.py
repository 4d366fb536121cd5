"""One subject of ``m2diff-preprocess run``: stages 2–9 (resample, register, mask, normalize, crop, write the
cubes, slices, QC montage) into ``OUT/subjects/<id>/`` and its ``subject.json`` record.

The folder is built under a temporary name and replaces an earlier version only once complete, with
``subject.json`` written last (:func:`m2diff_monai.io.atomic.staged_folder`): a failed subject leaves nothing behind.
The run around it (which subjects, reuse of up-to-date ones, workers, split, manifest) is :mod:`.pipeline`.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

import m2diff_monai
from m2diff_monai.data.grid import voxel_spacing
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json, save_nifti, staged_folder

from . import crop as crop_stage
from . import manifest as manifest_stage
from . import qc as qc_stage
from . import spacing as spacing_stage
from .cubes import prepare_cubes
from .intake import LoadedSubject
from .mri_window import MRI_BRAIN_MARGIN_MM
from .options import PipelineOptions
from .registration import keep_transforms, register_to_cube_grid
from .slices import select_slices, write_slices
from .subjects import SubjectRow

STAGES: tuple[str, ...] = (
    "resample",
    "registration",
    "mask",
    "normalization",
    "crop",
    "write_volumes",
    "slices",
    "qc",
)


def inputs_fingerprint(row: SubjectRow) -> dict:
    files = {role: getattr(row, role) for role in ("ld_pet", "sd_pet", "mri")}
    files.update({f"mask_{name}": p for name, p in sorted(row.masks.items())})
    return safety.fingerprint_files(files)


def _image(data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def _data(img: nib.Nifti1Image) -> np.ndarray:
    return np.asarray(img.dataobj, dtype=np.float32)


def process_subject(loaded: LoadedSubject, out_dir: Path, options: PipelineOptions) -> dict:
    """Run stages 2–9 for one loaded subject; write ``OUT/subjects/<id>/`` atomically; return its record."""
    sid = loaded.row.subject_id
    subjects_dir = Path(out_dir) / "subjects"
    subjects_dir.mkdir(parents=True, exist_ok=True)
    # an older version is replaced only once the new one is complete; the run already holds OUT's lock
    with staged_folder(subjects_dir / sid, lock=False) as work:
        record = _build_subject(loaded, work, options)
        save_json(work / "subject.json", record)
    return record


def _build_subject(loaded: LoadedSubject, work: Path, options: PipelineOptions) -> dict:
    row = loaded.row
    sid = row.subject_id
    inputs = inputs_fingerprint(row)  # before reading: an input changed during the run is redone next time
    timings: dict[str, float] = {}
    warnings = list(loaded.warnings)
    if loaded.ld_pet is None:
        raise InputError("no low-dose PET to preprocess (run `m2diff-preprocess simulate` first)", subject=sid)
    if options.space == "mri" and loaded.mri is None:
        raise InputError("--space mri needs an MRI, but this subject has none", subject=sid, path=row.ld_pet)
    bar = tqdm(total=len(STAGES), desc=sid, leave=False, unit="stage", disable=None if options.workers == 1 else True)

    def done(stage: str, start: float) -> float:
        timings[stage] = round(time.perf_counter() - start, 3)
        bar.set_postfix_str(stage)
        bar.update(1)
        return time.perf_counter()

    try:
        t = time.perf_counter()
        native_ld = loaded.ld_pet
        loaded, resampling = spacing_stage.resample_subject(loaded, options.target_spacing, options.space)
        t = done("resample", t)
        ld_img = loaded.ld_pet
        # intake guarantees SD is on the LD grid (within 0.1 voxel): it takes the LD affine.
        sd = _data(loaded.sd_pet) if loaded.sd_pet is not None else None
        pets = {"ld_pet": ld_img} if sd is None else {"ld_pet": ld_img, "sd_pet": _image(sd, ld_img.affine)}
        masks_src = {name: _data(m) > 0.5 for name, m in loaded.masks.items()}
        # the SD PET, when there is one, is the registration's PET (less noise); inference has only the LD PET
        aligned = register_to_cube_grid(
            pets,
            loaded.mri,
            "sd_pet" if sd is not None else "ld_pet",
            options.space,
            options.transform,
            seed=options.seed,
            masks=masks_src,
        )
        affine, mri, masks_src = aligned.affine, aligned.mri, aligned.masks
        ld, sd = aligned.pets["ld_pet"], aligned.pets.get("sd_pet")
        registration: dict | None = None
        if aligned.registration is not None:
            reg = aligned.registration
            try:
                kept = keep_transforms(
                    reg, work / "transforms", "mri_to_pet" if options.space == "pet" else "pet_to_mri"
                )
            finally:
                reg.cleanup()
            registration = _registration_record(reg, kept, aligned.moving, aligned.fixed)
        if registration is not None and not registration["improved"]:
            warnings.append(
                f"subject {sid}: registration lowered the MRI-PET mutual information "
                f"({registration['similarity']['mattes_mi']['before']:.3f} -> "
                f"{registration['similarity']['mattes_mi']['after']:.3f}); check qc.png"
            )
        t = done("registration", t)

        def stage_done(stage: str) -> None:
            nonlocal t
            t = done(stage, t)

        prepared = prepare_cubes(
            ld,
            affine,
            sd=sd,
            mri=mri,
            normalization=options.normalization,
            size=options.size,
            subject=sid,
            path=row.ld_pet,
            on_stage=stage_done,
        )
        spacing = voxel_spacing(affine)
        mask, box, cube_affine = prepared.grid_mask, prepared.box, prepared.cube_affine
        ld_scaling, sd_scaling, mri_scale = prepared.ld_scaling, prepared.sd_scaling, prepared.mri_scaling
        cubes = {"ld_pet": prepared.ld}
        if prepared.sd is not None:
            cubes["sd_pet"] = prepared.sd
        if prepared.mri is not None:
            cubes["mri"] = prepared.mri
        mask_cube = prepared.mask
        region_cubes = {name: crop_stage.crop_or_pad(m, box) for name, m in masks_src.items()}

        files: dict = {}
        for modality, cube in cubes.items():
            files[modality] = f"{modality}.nii.gz"
            save_nifti(work / files[modality], _image(cube, cube_affine))
        files["brain_mask"] = "brain_mask.nii.gz"
        save_nifti(work / files["brain_mask"], _image(mask_cube, cube_affine, dtype=np.uint8))
        files["regions"] = {}
        for name, cube in region_cubes.items():
            files["regions"][name] = f"regions/{name}.nii.gz"
            save_nifti(work / files["regions"][name], _image(cube, cube_affine, dtype=np.uint8))
        t = done("write_volumes", t)

        selection = {o: select_slices(mask_cube, o, options.slices_per_subject) for o in options.orientations}
        written = write_slices(work, cubes, selection, per_slice_minmax=options.normalization == "slice")
        t = done("slices", t)

        files["qc"] = "qc.png"
        qc_stage.save_montage(
            work / files["qc"], cubes, mask_cube, title=f"{sid} ({options.space} space, {options.transform})"
        )
        done("qc", t)
    finally:
        bar.close()

    normalization = {
        "method": options.normalization,
        **ld_scaling.as_dict(),
        "per_volume": {
            "ld_pet": ld_scaling.as_dict(),
            "sd_pet": sd_scaling.as_dict() if sd_scaling else None,
            "mri": {
                **mri_scale.as_dict(),
                "clipped": [0.0, 1.0] if options.normalization != "slice" else None,
                "brain_margin_mm": MRI_BRAIN_MARGIN_MM,
            }
            if mri_scale
            else None,
        },
        "pet_clipped": False,
        # slice: the cubes hold the scaling above; the written slices are min-max normalized one by one
        "slices": "per-slice min-max" if options.normalization == "slice" else "cube units",
    }
    return {
        "subject": sid,
        "version": m2diff_monai.__version__,
        "created": manifest_stage.now_iso(),
        "parameters": options.subject_parameters(),
        "inputs": inputs,
        "source": {
            k: (str(v) if v else None) for k, v in (("ld_pet", row.ld_pet), ("sd_pet", row.sd_pet), ("mri", row.mri))
        },
        "drf": row.drf,
        "space": options.space,
        "source_shape": [int(v) for v in native_ld.shape[:3]],
        "source_spacing": voxel_spacing(native_ld.affine),
        "source_affine": np.asarray(native_ld.affine).tolist(),
        "resampling": resampling,
        "grid_shape": [int(v) for v in mask.shape],
        "grid_affine": np.asarray(affine).tolist(),
        "shape": [options.size] * 3,
        "spacing": spacing,
        "affine": cube_affine.tolist(),
        "crop": box.as_dict(),
        "brain_voxels": int(mask.sum()),
        "normalization": normalization,
        "registration": registration,
        "sd_available": sd is not None,
        "mri_available": mri is not None,
        "files": files,
        "slices": {o: {"indices": selection[o], "files": written[o]} for o in options.orientations},
        "timings": timings,
        "warnings": warnings,
    }


def _registration_record(reg, kept: dict, moving: str, fixed: str) -> dict:
    return {
        "improved": bool(reg.similarity["mattes_mi"]["after"] >= reg.similarity["mattes_mi"]["before"]),
        "transform": reg.transform,
        "moving": moving,
        "fixed": fixed,
        "metric": "MattesMutualInformation",
        "similarity": reg.similarity,
        "transforms": {k: [f"transforms/{n}" for n in v] for k, v in kept.items()},
        "note": "forward maps moving→fixed (ants.apply_transforms order); for the inverse list, invert the .mat files",
        "seconds": round(reg.seconds, 3),
    }
