"""Builders for small synthetic subjects and the corpus of bad inputs every preprocessing CLI must refuse.

Import from tests as ``from badinputs import make_bad_input_corpus`` (``pythonpath = ["tests"]`` in pyproject.toml's
pytest options).

The anatomy is analytic and defined in world coordinates (mm), so a volume sampled on any grid (LPS, oblique,
another voxel size) shows the same "brain" at the same world position: a PET and an MRI written on different
grids are truly aligned, and later stages (registration, mask, crop) can run on the good subjects.

Every bad case is a complete subjects table with one good subject (``good01``) and one bad subject
(``bad01``), except ``duplicate_id`` (two rows share ``good01``). Cases in :data:`TABLE_LEVEL_CASES` are refused
when the table is read (``read_subjects``), so without ``--keep-going`` no subject of that table runs; of these,
:data:`TABLE_STRUCTURE_CASES` stop the run even under ``--keep-going`` (the table itself is wrong), while a row's
problem (``missing_file``) then fails ``bad01`` alone. The other cases fail only ``bad01``'s intake, and
``good01`` goes on under ``--keep-going``. :data:`CASE_OPTIONS` / :data:`CASE_CLI_ARGS`
hold the options a case needs to fail (``qform_sform`` only fails under ``qform_policy="reject"``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

PET_SHAPE = (24, 28, 20)
PET_VOXEL_MM = 2.0
MRI_SHAPE = (30, 34, 26)
MRI_VOXEL_MM = 1.6
# Ellipsoid "head" semi-axes (mm) centred on the world origin; fits both fields of view (~48x56x40 mm).
HEAD_SEMI_AXES = (18.0, 22.0, 15.0)

TABLE_LEVEL_CASES = frozenset({"missing_file", "duplicate_id", "malformed_id"})
TABLE_STRUCTURE_CASES = frozenset({"duplicate_id", "malformed_id"})
CASE_OPTIONS: dict[str, dict] = {"qform_sform": {"qform_policy": "reject"}}
CASE_CLI_ARGS: dict[str, list[str]] = {"qform_sform": ["--qform-policy", "reject"]}

BAD_CASES = (
    "truncated",
    "nan",
    "inf",
    "4d_no_frame",
    "qform_sform",
    "zero_byte",
    "not_gzip",
    "missing_file",
    "duplicate_id",
    "malformed_id",
    "no_overlap",
)
GOOD_CASES = ("basic", "lps", "oblique")


def centred_affine(shape, voxel_mm: float, rotation_deg: float = 0.0, flip_lps: bool = False) -> np.ndarray:
    """Affine of a grid whose centre sits at the world origin; optionally LPS-stored or rotated about z."""
    axes = np.diag([voxel_mm] * 3)
    if flip_lps:
        axes = axes @ np.diag([-1.0, -1.0, 1.0])
    if rotation_deg:
        t = np.deg2rad(rotation_deg)
        rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
        rot2 = np.array([[1, 0, 0], [0, np.cos(t / 2), -np.sin(t / 2)], [0, np.sin(t / 2), np.cos(t / 2)]])
        axes = rot @ rot2 @ axes
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = -axes @ ((np.asarray(shape[:3]) - 1) / 2.0)
    return affine


def world_coordinates(shape, affine: np.ndarray) -> np.ndarray:
    """(3, X, Y, Z) world coordinates of every voxel centre."""
    idx = np.indices(shape[:3], dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ idx + affine[:3, 3:4]).reshape(3, *shape[:3])


def phantom(
    shape, affine: np.ndarray, modality: str, offset_mm=(0.0, 0.0, 0.0), seed: int = 0, noise: float = 0.02
) -> np.ndarray:
    """A blob-shaped brain sampled on ``(shape, affine)``.

    ``pet``: bright cortex-like shell, warm centre, two hot spots; ``mri``: T1-like (bright white matter, grey
    shell, dark ventricle-like core, faint scalp). ``offset_mm`` moves the anatomy in world space.
    """
    x, y, z = world_coordinates(shape, affine) - np.asarray(offset_mm, dtype=np.float64).reshape(3, 1, 1, 1)
    a, b, c = HEAD_SEMI_AXES
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    brain = 1.0 / (1.0 + np.exp((r - 0.85) / 0.03))
    shell = np.exp(-(((r - 0.75) / 0.08) ** 2))
    core = np.exp(-((r / 0.3) ** 2))
    if modality == "pet":
        hot = np.exp(-(((x - 6) ** 2 + (y - 5) ** 2 + (z - 2) ** 2) / 12.0))
        hot += 0.7 * np.exp(-(((x + 7) ** 2 + (y + 6) ** 2 + (z + 1) ** 2) / 10.0))
        vol = 1000.0 * (0.4 * brain + 0.8 * shell + 0.6 * hot + 0.2 * core * brain)
    elif modality == "mri":
        scalp = np.exp(-(((r - 0.95) / 0.04) ** 2))
        vol = 400.0 * (0.9 * brain - 0.35 * shell - 0.5 * core * brain + 0.3 * scalp)
    else:
        raise ValueError(f"modality must be pet or mri, got {modality!r}")
    rng = np.random.default_rng(seed)
    vol = vol + noise * float(vol.max()) * rng.standard_normal(vol.shape)
    return np.clip(vol, 0, None).astype(np.float32)


def save(path: Path, data: np.ndarray, affine: np.ndarray, qform: np.ndarray | None = None) -> Path:
    """Save with the sform = ``affine`` and the qform = ``qform`` (default: the same affine), both coded."""
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_sform(affine, code="scanner")
    img.header.set_qform(affine if qform is None else qform, code="scanner")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_subject(
    folder: Path,
    subject_id: str,
    *,
    flip_lps: bool = False,
    rotation_deg: float = 0.0,
    with_mri: bool = True,
    with_mask: bool = False,
    seed: int = 0,
    pet_voxel_mm: float = PET_VOXEL_MM,
) -> dict[str, str]:
    """Write a good subject (LD/SD PET on one grid, MRI on its own finer grid); return its table cells.
    ``pet_voxel_mm`` changes the PET voxel size and keeps the field of view (the same anatomy, another scanner)."""
    pet_shape = tuple(max(1, round(n * PET_VOXEL_MM / pet_voxel_mm)) for n in PET_SHAPE)
    affine = centred_affine(pet_shape, pet_voxel_mm, rotation_deg, flip_lps)
    sd = phantom(pet_shape, affine, "pet", seed=seed, noise=0.02)
    ld = phantom(pet_shape, affine, "pet", seed=seed + 1, noise=0.15)
    cells = {"subject_id": subject_id, "ld_pet": "", "sd_pet": "", "mri": ""}
    cells["sd_pet"] = _rel(save(folder / subject_id / "sd_pet.nii.gz", sd, affine), folder)
    cells["ld_pet"] = _rel(save(folder / subject_id / "ld_pet.nii.gz", ld, affine), folder)
    if with_mri:
        mri_affine = centred_affine(MRI_SHAPE, MRI_VOXEL_MM, flip_lps=flip_lps)
        mri = phantom(MRI_SHAPE, mri_affine, "mri", seed=seed + 2)
        cells["mri"] = _rel(save(folder / subject_id / "t1.nii.gz", mri, mri_affine), folder)
    if with_mask:
        lesion = (
            np.linalg.norm(world_coordinates(pet_shape, affine) - np.array([6, 5, 2]).reshape(3, 1, 1, 1), axis=0) < 4.0
        ).astype(np.uint8)
        cells["mask_lesion"] = _rel(save(folder / subject_id / "lesion.nii.gz", lesion, affine), folder)
    return cells


def write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    columns = ["subject_id", "ld_pet", "sd_pet", "mri"]
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_good_input_corpus(root: Path) -> dict[str, Path]:
    """Tables that must pass intake: ``basic`` (one subject with MRI and a lesion mask, one MRI-free),
    ``lps`` (files stored LPS), ``oblique`` (PET grid rotated 12° about z and 6° about x)."""
    root = Path(root)
    out = {}
    folder = root / "basic"
    folder.mkdir(parents=True, exist_ok=True)
    out["basic"] = write_table(
        folder / "subjects.csv",
        [
            write_subject(folder, "good01", with_mask=True, seed=10),
            write_subject(folder, "nomri01", with_mri=False, seed=20),
        ],
    )
    for name, kwargs in (("lps", {"flip_lps": True}), ("oblique", {"rotation_deg": 12.0})):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        out[name] = write_table(folder / "subjects.csv", [write_subject(folder, "good01", seed=30, **kwargs)])
    return out


def make_bad_input_corpus(root: Path) -> dict[str, tuple[Path, str]]:
    """One folder per case under ``root``; returns ``{case: (subjects_csv, expected_message_fragment)}``.

    The fragment appears in the one-line error a CLI prints. See the module docstring for the table layout,
    :data:`TABLE_LEVEL_CASES` and :data:`CASE_OPTIONS`.
    """
    root = Path(root)
    corpus: dict[str, tuple[Path, str]] = {}
    for case in BAD_CASES:
        folder = root / case
        folder.mkdir(parents=True, exist_ok=True)
        good = write_subject(folder, "good01", seed=1)
        bad = write_subject(folder, "bad01", seed=2)
        ld = folder / bad["ld_pet"]
        affine = centred_affine(PET_SHAPE, PET_VOXEL_MM)
        rows = [good, bad]
        if case == "truncated":
            raw = ld.read_bytes()
            ld.write_bytes(raw[: len(raw) // 2])
            fragment = "truncated"
        elif case in ("nan", "inf"):
            data = np.asarray(nib.load(ld).dataobj)
            data[10, 12, 8] = np.nan if case == "nan" else np.inf
            data[3, 4, 5] = np.nan if case == "nan" else -np.inf
            save(ld, data, affine)
            fragment = "2 NaN" if case == "nan" else "2 Inf"
        elif case == "4d_no_frame":
            frames = np.stack([phantom(PET_SHAPE, affine, "pet", seed=s, noise=0.15) for s in range(3)], axis=-1)
            save(ld, frames, affine)
            fragment = "--frame"
        elif case == "qform_sform":
            shifted = affine.copy()
            shifted[:3, 3] += (5.0, 0.0, 0.0)
            save(ld, np.asarray(nib.load(ld).dataobj), affine, qform=shifted)
            fragment = "qform and sform disagree"
        elif case == "zero_byte":
            ld.write_bytes(b"")
            fragment = "empty (0 bytes)"
        elif case == "not_gzip":
            nii = ld.with_name("ld_pet.nii")
            save(nii, np.asarray(nib.load(ld).dataobj), affine)
            ld.write_bytes(nii.read_bytes())
            nii.unlink()
            fragment = "not gzip"
        elif case == "missing_file":
            ld.unlink()
            fragment = "does not exist"
        elif case == "duplicate_id":
            bad["subject_id"] = "good01"
            fragment = "duplicate subject_id"
        elif case == "malformed_id":
            bad["subject_id"] = "bad 01/x"
            fragment = "may contain only letters"
        elif case == "no_overlap":
            mri_path = folder / bad["mri"]
            mri_affine = centred_affine(MRI_SHAPE, MRI_VOXEL_MM)
            moved = mri_affine.copy()
            moved[:3, 3] += (0.0, 0.0, 300.0)  # a different origin: the MRI now sits 30 cm above the PET
            save(mri_path, np.asarray(nib.load(mri_path).dataobj), moved)
            fragment = "do not overlap"
        else:  # pragma: no cover - BAD_CASES and this chain are edited together
            raise AssertionError(case)
        corpus[case] = (write_table(folder / "subjects.csv", rows), fragment)
    return corpus


def _rel(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


# ------------------------------------------------------------------------------------- unsafe outputs (issue 13)
# Ordinary command-line mistakes that must never destroy an input, write outside the output, or serve a stale
# result. Each tool must refuse the first five classes with a one-line InputError before any work, leaving every
# input byte-identical; the last three are behaviours (resume, concurrency, --keep-going), tested in
# tests/test_safety.py. A hidden corpus with more cases of these classes is also run against the tools.
SAFETY_CLASSES = (
    "out_holds_raw_cohort",  # run --out DIR where DIR/subjects/<id>/ holds the raw files
    "manifest_is_table",  # run --manifest pointing at the subjects table (or any input)
    "infer_out_dir_holds_source",  # infer --out-dir DIR where DIR/<id>.nii.gz is a source LD PET
    "export_out_holds_checkpoint",  # export --out RUN --force where RUN holds the checkpoint
    "manifest_id_traversal",  # a manifest subject id with ../ (evaluate and cohort inference)
    "same_size_rewrite",  # an input rewritten in place with the same size: the rerun must redo the subject
    "concurrent_runs",  # two runs on one --out: the second refuses; temps of a live owner are never deleted
    "keep_going_missing_file",  # --keep-going and a table row whose file is missing: that subject fails alone
)


def tree_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (symlinks not followed): a before/after snapshot
    proving that no input was changed, deleted or added to."""
    import hashlib
    import os

    root = Path(root)
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link:" + os.readlink(path)
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        for name in dirs:
            path = Path(folder) / name
            if path.is_symlink():
                out[path.relative_to(root).as_posix()] = "link:" + os.readlink(path)
    return out


def make_unsafe_output_corpus(root: Path) -> dict[str, tuple[list[str], str, Path]]:
    """``{case: (m2diff-preprocess argv, expected message fragment, folder to snapshot)}``: preprocessing command
    lines whose outputs would replace or delete an input. Each must exit 2 with one line containing the fragment
    and leave the snapshot folder byte-identical (see :func:`tree_digest`)."""
    root = Path(root)
    cases: dict[str, tuple[list[str], str, Path]] = {}

    def cohort(name: str, layout: str = "") -> tuple[Path, Path]:
        folder = root / name / layout if layout else root / name
        folder.mkdir(parents=True, exist_ok=True)
        table = write_table(
            folder / "subjects.csv", [write_subject(folder, "good01", seed=1), write_subject(folder, "good02", seed=2)]
        )
        return root / name, table

    fast = ["--transform", "rigid", "--size", "32"]
    # 1. --out is the folder whose subjects/<id>/ already hold the raw cohort
    top, table = cohort("out_holds_raw_cohort", "subjects")
    cases["out_holds_raw_cohort"] = (
        ["run", "--subjects", str(table), "--out", str(top), "--manifest", str(top / "m.json"), *fast],
        "holds the input",
        top,
    )
    # 2. --manifest is the subjects table itself
    top, table = cohort("manifest_is_table")
    cases["manifest_is_table"] = (
        ["run", "--subjects", str(table), "--out", str(top / "out"), "--manifest", str(table), *fast],
        "would overwrite the input subjects table",
        top,
    )
    # 2b. --manifest is a listed image
    top, table = cohort("manifest_is_input_image")
    cases["manifest_is_input_image"] = (
        [
            "run",
            "--subjects",
            str(table),
            "--out",
            str(top / "out"),
            "--manifest",
            str(top / "good01" / "ld_pet.nii.gz"),
            *fast,
        ],
        "would overwrite the input",
        top,
    )
    # 1b. a subject's output folder is a symlink to the raw folder (symlinks are followed)
    top, table = cohort("out_subject_folder_is_symlink")
    (top / "out" / "subjects").mkdir(parents=True)
    (top / "out" / "subjects" / "good02").symlink_to(top / "good02", target_is_directory=True)
    cases["out_subject_folder_is_symlink"] = (
        ["run", "--subjects", str(table), "--out", str(top / "out"), "--manifest", str(top / "m.json"), *fast],
        "holds the input",
        top,
    )
    # 1c. the table sits where the QC summary goes
    top = root / "qc_summary_is_table"
    qc = top / "out" / "qc"
    qc.mkdir(parents=True)
    rows = [write_subject(qc, "good01", seed=1)]
    table = write_table(qc / "summary.csv", rows)
    cases["qc_summary_is_table"] = (
        ["run", "--subjects", str(table), "--out", str(top / "out"), "--manifest", str(top / "m.json"), *fast],
        "would overwrite the input subjects table",
        top,
    )
    # 2c. simulate --out is the table's own folder: the new table would replace the input table
    top = root / "simulate_out_is_table_folder"
    cells = write_subject(top, "good01", seed=1)
    cells["ld_pet"] = ""
    table = write_table(top / "subjects.csv", [cells])
    cases["simulate_out_is_table_folder"] = (
        ["simulate", "--subjects", str(table), "--out", str(top)],
        "would overwrite the input subjects table",
        top,
    )
    return cases


def rewrite_manifest_subject(manifest: Path, out: Path, old: str, new: str) -> Path:
    """A copy of ``manifest`` at ``out`` (same folder: relative paths keep working) where subject ``old`` is
    renamed ``new`` (e.g. ``../escape``): the manifest-id traversal class."""
    import json

    content = json.loads(Path(manifest).read_text())
    for key in ("training", "validation", "test", "volumes"):
        for item in content.get(key, []):
            if item.get("subject") == old:
                item["subject"] = new
    Path(out).write_text(json.dumps(content))
    return Path(out)
