"""``m2diff-preprocess run``: subjects table → registered, normalized cubes, 2D slices, QC and a MONAI manifest.

Per subject (stages 2–9): resampling to the run's one voxel size (:mod:`.spacing`) → registration
(:mod:`.registration`) → brain mask (:mod:`.mask`) → normalization
(:mod:`.normalization`) → crop/pad (:mod:`.crop`) → slices (:mod:`.slices`) → QC montage (:mod:`.qc`) →
``subject.json``. Per run: split (:mod:`.split`), manifest (:mod:`.manifest`), QC summary.

Guarantees:
- a subject folder is built in ``OUT/subjects/.tmp.<id>.*`` and renamed into place only when complete, with
  ``subject.json`` written last: a failed subject leaves nothing behind and never reaches a manifest;
- a rerun skips subjects whose ``subject.json`` records the same parameters and the same input files (path and a
  content fingerprint, :func:`m2diff_monai.io.safety.fingerprint`) unless ``force``; a subject whose input changed
  is redone and reported; the split is computed over the whole table, so shards, reruns and worker counts agree;
- no input is ever replaced or deleted: before any work, every subject folder, QC table and the manifest the run
  may write is checked against the table and every file it lists (:mod:`.outputs`); one run at a time holds
  ``OUT`` (a lock file per shard), and stale temporary folders are removed only when their owner process is gone;
- ``workers > 1`` processes subjects in separate processes (spawned; ITK threads = cores // workers each);
- ``shard=(I, N)`` (1-based) processes the subjects whose position in the id-sorted table is ≡ I−1 (mod N)
  and writes a manifest for that share; ``m2diff-preprocess merge`` joins the shard manifests.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

import m2diff_monai
from m2diff_monai.data.grid import voxel_spacing
from m2diff_monai.data.orientation import parse_orientations
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json, save_nifti, staged_folder
from m2diff_monai.runtime import allowed_threads

from . import crop as crop_stage
from . import manifest as manifest_stage
from . import outputs as output_guard
from . import qc as qc_stage
from . import spacing as spacing_stage
from .intake import IntakeOptions, LoadedSubject, load_subject
from .cubes import prepare_cubes
from .mri_window import MRI_BRAIN_MARGIN_MM
from .normalization import METHODS, cli_method
from .registration import SPACES, keep_transforms, normalize_transform_name, register_to_cube_grid
from .slices import parse_slices_per_subject, select_slices, write_slices
from .split import assign_splits, parse_ratios
from .subjects import SubjectRow, read_subjects

STAGES: tuple[str, ...] = (
    "resample", "registration", "mask", "normalization", "crop", "write_volumes", "slices", "qc",
)


def parse_shard(value: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"I/N"`` (1-based: 1 <= I <= N) → (I, N)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts = value.split("/")
        try:
            i, n = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"--shard must look like I/N with whole numbers (e.g. 1/4), got {value!r}") from None
    else:
        i, n = (int(v) for v in value)
    if n < 1 or not 1 <= i <= n:
        raise ValueError(f"--shard I/N needs 1 <= I <= N (1-based), got {i}/{n}")
    return i, n


@dataclass(frozen=True)
class PipelineOptions:
    transform: str = "SyN"
    space: str = "pet"
    size: int = 256  # cube edge in voxels at the target spacing
    spacing: str | tuple[float, float, float] = spacing_stage.AUTO  # auto | native | (x, y, z) mm
    cohort_spacing: tuple[float, float, float] | None = None  # `auto` resolved over the whole table (run_pipeline)
    orientations: tuple[str, ...] = ("axial", "coronal", "sagittal")
    slices_per_subject: int | None = None  # None = every slice that contains brain
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    normalization: str = "shared"
    workers: int = 1
    shard: tuple[int, int] | None = None
    keep_going: bool = False
    force: bool = False
    intake: IntakeOptions = IntakeOptions()
    notes: str = ""  # free text into manifest provenance

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "transform", normalize_transform_name(self.transform))
        if self.space not in SPACES:
            raise ValueError(f"--space must be one of {', '.join(SPACES)}, got {self.space!r}")
        set_(self, "size", crop_stage.validate_size(self.size))
        set_(self, "spacing", spacing_stage.parse_spacing(self.spacing))
        if self.cohort_spacing is not None:
            set_(self, "cohort_spacing", spacing_stage.parse_spacing(self.cohort_spacing))
        set_(self, "orientations", parse_orientations(self.orientations))
        set_(self, "slices_per_subject", parse_slices_per_subject(self.slices_per_subject))
        set_(self, "split", parse_ratios(self.split))
        try:
            set_(self, "normalization", cli_method(self.normalization))
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--normalization: {err}") from None
        if int(self.workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        set_(self, "shard", parse_shard(self.shard))

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        """The voxel size every subject is resampled to; None = each keeps its own (``native``, or ``auto`` not yet
        resolved over a cohort: a cohort of one subject has its own spacing as median)."""
        if self.spacing == spacing_stage.NATIVE:
            return None
        return self.cohort_spacing if self.spacing == spacing_stage.AUTO else self.spacing

    def subject_parameters(self) -> dict:
        """Everything that shapes a subject's outputs: a rerun with equal parameters may reuse them."""
        target = self.target_spacing
        return {
            "transform": self.transform,
            "space": self.space,
            "size": self.size,
            "spacing": None if target is None else [float(v) for v in target],
            "orientations": list(self.orientations),
            "slices_per_subject": self.slices_per_subject,
            "normalization": self.normalization,
            "seed": int(self.seed),
            "intake": {
                "frame": self.intake.frame,
                "sum_frames": bool(self.intake.sum_frames),
                "qform_policy": self.intake.qform_policy,
            },
        }

    def manifest_parameters(self) -> dict:
        """Subject parameters plus the split: shard manifests merge only when these agree."""
        rule = self.spacing if isinstance(self.spacing, str) else "fixed"
        return {**self.subject_parameters(), "spacing_rule": rule, "split": [float(r) for r in self.split]}


@dataclass
class RunSummary:
    manifest: Path | None
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # subject → one-line message
    changed: dict[str, list[str]] = field(default_factory=dict)  # subject → input roles changed since its last run
    splits: dict[str, str] = field(default_factory=dict)
    qc_summary: Path | None = None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# ---------------------------------------------------------------------------------------------------- subject
def _inputs_fingerprint(row: SubjectRow) -> dict:
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
    inputs = _inputs_fingerprint(row)  # before reading: an input changed during the run is redone next time
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
        aligned = register_to_cube_grid(pets, loaded.mri, "sd_pet" if sd is not None else "ld_pet", options.space,
                                        options.transform, seed=options.seed, masks=masks_src)
        affine, mri, masks_src = aligned.affine, aligned.mri, aligned.masks
        ld, sd = aligned.pets["ld_pet"], aligned.pets.get("sd_pet")
        registration: dict | None = None
        if aligned.registration is not None:
            reg = aligned.registration
            try:
                kept = keep_transforms(reg, work / "transforms",
                                       "mri_to_pet" if options.space == "pet" else "pet_to_mri")
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

        prepared = prepare_cubes(ld, affine, sd=sd, mri=mri, normalization=options.normalization, size=options.size,
                                 subject=sid, path=row.ld_pet, on_stage=stage_done)
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
        qc_stage.save_montage(work / files["qc"], cubes, mask_cube, title=f"{sid} ({options.space} space, {options.transform})")
        done("qc", t)
    finally:
        bar.close()

    normalization = {
        "method": options.normalization,
        **ld_scaling.as_dict(),
        "per_volume": {
            "ld_pet": ld_scaling.as_dict(),
            "sd_pet": sd_scaling.as_dict() if sd_scaling else None,
            "mri": {**mri_scale.as_dict(), "clipped": [0.0, 1.0] if options.normalization != "slice" else None,
                    "brain_margin_mm": MRI_BRAIN_MARGIN_MM}
            if mri_scale else None,
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
        "source": {k: (str(v) if v else None) for k, v in (("ld_pet", row.ld_pet), ("sd_pet", row.sd_pet), ("mri", row.mri))},
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


# ---------------------------------------------------------------------------------------------------- run
def _select_shard(rows: list[SubjectRow], shard: tuple[int, int] | None) -> list[SubjectRow]:
    ordered = sorted(rows, key=lambda r: r.subject_id)
    if shard is None:
        return ordered
    i, n = shard
    return [r for pos, r in enumerate(ordered) if pos % n == i - 1]


def _existing_record(final: Path, row: SubjectRow, options: PipelineOptions,
                     changed: dict[str, list[str]] | None = None) -> dict | None:
    """The saved record when the subject is done with these parameters and inputs, else None (the input roles
    whose content changed since that record go into ``changed``)."""
    path = final / "subject.json"
    if options.force or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("parameters") != options.subject_parameters():
        return None
    stale = safety.stale_roles(record.get("inputs"), _inputs_fingerprint(row))
    if stale:
        if changed is not None:
            changed[row.subject_id] = stale
        return None
    files = record.get("files", {})
    needed = [files.get(k) for k in ("ld_pet", "sd_pet", "mri", "brain_mask") if files.get(k)]
    if not all((final / f).is_file() for f in needed):
        return None
    return record


def _init_worker(threads: int) -> None:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _run_one(row: SubjectRow, out_dir: Path, options: PipelineOptions) -> tuple[str, dict | None, str | None, bool]:
    """(subject, record, error line, error is an InputError) — never raises, so workers report every failure."""
    try:
        loaded = load_subject(row, options.intake)
        return row.subject_id, process_subject(loaded, out_dir, options), None, False
    except InputError as err:
        line = err.line()
        if err.subject is None and not line.startswith(f"subject {row.subject_id}"):
            line = f"subject {row.subject_id}: {line}"
        return row.subject_id, None, line, True
    except Exception as err:  # an internal error must not take the other subjects down under --keep-going
        detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        return row.subject_id, None, f"subject {row.subject_id}: internal error: {type(err).__name__}: {err}\n{detail}", False


def run_pipeline(subjects_csv: Path, out_dir: Path, manifest_path: Path, options: PipelineOptions) -> RunSummary:
    """Preprocess the subjects table (or its shard), then write the manifest and the QC summary.

    Without ``keep_going`` the first failing subject stops the run: its :class:`InputError` is raised (subjects
    already finished stay valid and are skipped by the next run) and no manifest is written. With ``keep_going``
    failures are collected in the summary and the manifest lists only the good subjects; a subject whose table
    row is bad (a listed file missing...) fails alone then. Raises :class:`InputError` before any work when an
    output would replace an input (:mod:`.outputs`) or another run holds ``out_dir``.
    """
    subjects_csv, out_dir, manifest_path = Path(subjects_csv), Path(out_dir), Path(manifest_path)
    problems: dict[str, InputError] | None = {} if options.keep_going else None
    rows = read_subjects(subjects_csv, problems=problems)
    if options.spacing == spacing_stage.AUTO:  # over the whole table, so that shards agree
        grid_files = [r.ld_pet if options.space == "pet" else r.mri for r in rows
                      if r.subject_id not in (problems or {})]
        options = replace(options, cohort_spacing=spacing_stage.resolve_target(spacing_stage.AUTO, grid_files))
    suffix = f"_shard-{options.shard[0]}-of-{options.shard[1]}" if options.shard else ""
    output_guard.guard_run(subjects_csv, rows, _select_shard(rows, options.shard), out_dir, manifest_path,
                           [f"summary{suffix}.csv", f"summary{suffix}.md"])
    lock_name = f".m2diff-preprocess{suffix.replace('_', '.')}.lock"
    with safety.output_lock(out_dir, "m2diff-preprocess", "--out", lock_name):
        return _run_locked(rows, problems or {}, subjects_csv, out_dir, manifest_path, options)


def _run_locked(rows: list[SubjectRow], problems: dict[str, InputError], subjects_csv: Path, out_dir: Path,
                manifest_path: Path, options: PipelineOptions) -> RunSummary:
    splits = assign_splits(
        [r.subject_id for r in rows],
        explicit={r.subject_id: r.split for r in rows},
        has_target={r.subject_id: r.sd_pet is not None for r in rows},
        ratios=options.split,
        seed=options.seed,
    )
    mine = _select_shard(rows, options.shard)
    summary = RunSummary(manifest=None, splits={r.subject_id: splits[r.subject_id] for r in mine})
    records: dict[str, dict] = {}
    todo: list[SubjectRow] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    def fail(sid: str, line: str, is_input_error: bool) -> None:
        if not options.keep_going:
            if is_input_error:
                raise InputError(line)  # the line already names the subject and the file
            raise RuntimeError(line)
        summary.failed[sid] = line

    for row in mine:
        sid = row.subject_id
        if sid in problems:
            fail(sid, problems[sid].line(), True)
            continue
        if row.sd_pet is None and splits[sid] in ("train", "val"):
            fail(sid, InputError(f"split {splits[sid]!r} needs a standard-dose PET, but sd_pet is empty",
                                 subject=sid, path=subjects_csv).line(), True)
            continue
        record = _existing_record(out_dir / "subjects" / sid, row, options, summary.changed)
        if record is not None:
            records[sid] = record
            summary.skipped.append(sid)
        else:
            todo.append(row)

    bar = tqdm(total=len(todo), desc="subjects", unit="subject", disable=None)
    try:
        if options.workers == 1 or len(todo) <= 1:
            for row in todo:
                sid, record, line, is_input = _run_one(row, out_dir, options)
                bar.update(1)
                if record is None:
                    fail(sid, line or "failed", is_input)
                else:
                    records[sid] = record
                    summary.processed.append(sid)
        else:
            _run_parallel(todo, out_dir, options, records, summary, fail, bar)
    finally:
        bar.close()

    done = sorted(records)
    qc_dir = out_dir / "qc"
    suffix = f"_shard-{options.shard[0]}-of-{options.shard[1]}" if options.shard else ""
    rows_out = [qc_stage.summary_row(sid, "skipped" if sid in summary.skipped else "processed", splits[sid], records[sid])
                for sid in done]
    rows_out += [qc_stage.summary_row(sid, "failed", splits.get(sid, ""), error=msg.splitlines()[0])
                 for sid, msg in sorted(summary.failed.items())]
    qc_stage.write_summary(qc_dir / f"summary{suffix}.csv", qc_dir / f"summary{suffix}.md", rows_out)
    summary.qc_summary = qc_dir / f"summary{suffix}.csv"

    prov = manifest_stage.provenance(
        options.manifest_parameters(),
        notes=options.notes,
        shard=options.shard,
        subjects_csv=manifest_stage.relative_path(subjects_csv, manifest_path.resolve().parent),
    )
    entries = [(records[sid], out_dir / "subjects" / sid, splits[sid]) for sid in done]
    manifest = manifest_stage.build_manifest(manifest_path.stem, entries, manifest_path, prov)
    manifest_stage.write_manifest(manifest_path, manifest)
    summary.manifest = manifest_path
    return summary


def _run_parallel(todo, out_dir, options, records, summary, fail, bar) -> None:
    threads = max(1, allowed_threads()[0] // options.workers)  # CPUs we may use, not all visible
    if os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        threads = min(threads, int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"]))
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold ITK/OpenMP threads
    with ProcessPoolExecutor(options.workers, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        pending = {pool.submit(_run_one, row, out_dir, options) for row in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    sid, record, line, is_input = future.result()
                    bar.update(1)
                    if record is None:
                        fail(sid, line or "failed", is_input)
                    else:
                        records[sid] = record
                        summary.processed.append(sid)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    summary.processed.sort()


# ---------------------------------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run`` options to ``parser`` (called by :mod:`preprocessing.cli`)."""
    d = PipelineOptions()
    parser.add_argument("--subjects", required=True, type=Path, help="subjects table (CSV)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (subjects/<id>/, qc/); refused before any work when a folder it would "
                             "replace holds an input, or while another run writes to it (docs/safety.md)")
    parser.add_argument("--manifest", required=True, type=Path,
                        help="manifest to write, e.g. data_manifests/NAME.json (never the table or an input)")
    parser.add_argument("--transform", default=d.transform, help="SyN (paper, default) | affine | rigid")
    parser.add_argument("--space", default=d.space, choices=SPACES,
                        help="pet: T1 resampled on the PET grid (default); mri: PET resampled on the T1 grid")
    parser.add_argument("--size", type=int, default=d.size,
                        help="cube edge in voxels at the target --spacing, a multiple of 16 (default 256)")
    parser.add_argument("--spacing", default=d.spacing,
                        help="voxel size every subject is resampled to: auto (default: the cohort's per-axis median), "
                             "X or X,Y,Z in mm (RAS axes), or native (no resampling)")
    parser.add_argument("--orientations", default=",".join(d.orientations), help="comma list of axial,coronal,sagittal")
    parser.add_argument("--slices-per-subject", default="all",
                        help="'all' brain slices (default) or N slices uniformly across the brain's extent")
    parser.add_argument("--split", default=",".join(str(r) for r in d.split),
                        help="train,val,test ratios for subjects without a split column (default 0.8,0.1,0.1)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split shuffle and of ANTs sampling")
    parser.add_argument("--normalization", default=d.normalization, type=cli_method, metavar="|".join(METHODS),
                        help="shared: one LD-derived scale for LD and SD (default); volume: per-volume min-max; "
                             "slice: every 2D slice min-max on its own (the official M2Diff loader)")
    parser.add_argument("--workers", type=int, default=d.workers, help="subjects processed in parallel processes")
    parser.add_argument("--shard", default=None, help="I/N (1-based): process only the id-sorted subjects with index %% N == I-1")
    parser.add_argument("--keep-going", action="store_true",
                        help="report bad subjects (a bad table row too) and finish the others (exit 1); table "
                             "structure errors still stop the run")
    parser.add_argument("--force", action="store_true",
                        help="redo subjects even when their outputs are up to date (replaces only this tool's "
                             "subject folders; never an input: see docs/safety.md)")
    parser.add_argument("--frame", type=int, default=None, help="0-based frame of a 4D PET to use")
    parser.add_argument("--sum-frames", action="store_true", help="sum the frames of a 4D PET")
    parser.add_argument("--qform-policy", default="warn", choices=("warn", "reject"),
                        help="when qform and sform disagree: warn (use the sform) or reject the subject")
    parser.add_argument("--notes", default="", help="free text recorded in the manifest's provenance")
    return parser


def options_from_args(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        transform=args.transform,
        space=args.space,
        size=args.size,
        spacing=args.spacing,
        orientations=args.orientations,
        slices_per_subject=args.slices_per_subject,
        split=args.split,
        seed=args.seed,
        normalization=args.normalization,
        workers=args.workers,
        shard=args.shard,
        keep_going=args.keep_going,
        force=args.force,
        intake=IntakeOptions(frame=args.frame, sum_frames=args.sum_frames, qform_policy=args.qform_policy),
        notes=args.notes,
    )


def main(args: argparse.Namespace) -> int:
    """``m2diff-preprocess run``: 0 on success, 2 on bad input (one line on stderr), 1 when --keep-going skipped some."""
    try:
        options = options_from_args(args)
    except ValueError as err:
        print(f"m2diff-preprocess run: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run_pipeline(args.subjects, args.out, args.manifest, options)
    except InputError as err:
        print(err.line(), file=sys.stderr)
        return 2
    for line in summary.failed.values():
        print(line, file=sys.stderr)
    for sid, roles in summary.changed.items():
        print(f"subject {sid}: {', '.join(roles)} changed since its last run; redone", file=sys.stderr)
    print(
        f"processed {len(summary.processed)}, skipped {len(summary.skipped)} (up to date), failed {len(summary.failed)}; "
        f"manifest {summary.manifest}; QC summary {summary.qc_summary}"
    )
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main(configure(argparse.ArgumentParser(prog="m2diff-preprocess run")).parse_args()))
