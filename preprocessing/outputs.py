"""What each ``m2diff-preprocess`` command will write, checked against what it reads before any work starts.

The rule itself lives in :mod:`m2diff_monai.io.safety`; this module only lists, per command, the run's inputs and
every path the command may create, replace or delete.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from m2diff_monai.errors import InputError
from m2diff_monai.io.safety import RunInputs, child

from .subjects import SubjectRow


def table_inputs(subjects_csv: Path, rows: Iterable[SubjectRow]) -> RunInputs:
    """The table and every file it lists (all rows: one subject's output must not replace another's input)."""
    inputs = RunInputs([("subjects table", subjects_csv)])
    for row in rows:
        for role, path in row.files().items():
            inputs.add(f"{role} of subject {row.subject_id}", path)
    return inputs


def check_out_folder(out_dir: Path, option: str = "--out") -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{option} exists and is not a folder", path=out_dir)


def guard_run(
    subjects_csv: Path,
    rows: Sequence[SubjectRow],
    mine: Sequence[SubjectRow],
    out_dir: Path,
    manifest_path: Path,
    qc_names: Sequence[str],
) -> None:
    """``run``: every subject folder it may replace (``OUT/subjects/<id>``), the QC tables and the manifest."""
    inputs = table_inputs(subjects_csv, rows)
    check_out_folder(out_dir)
    subjects_dir = out_dir / "subjects"
    for row in mine:  # the input it would destroy is the clearer message, so that check comes first
        inputs.check(subjects_dir / row.subject_id, "--out")
        child(subjects_dir, row.subject_id, "--out", "subject id")
    for name in qc_names:
        inputs.check(out_dir / "qc" / name, "--out")
    inputs.check(manifest_path, "--manifest")


def guard_merge(
    manifests: Sequence[Path], out: Path, qc_targets: Sequence[Path], qc_sources: Sequence[Path] = ()
) -> None:
    """``merge``: the merged manifest and QC tables must not replace a shard manifest or a shard QC table."""
    inputs = RunInputs([*((f"manifest {p}", p) for p in manifests), *((f"QC table {p}", p) for p in qc_sources)])
    inputs.check(out, "--out")
    for target in qc_targets:
        inputs.check(target, "--out")


def guard_simulate_table(table: Path, rows: Sequence[SubjectRow], out_dir: Path) -> None:
    """``simulate --subjects``: the new table and each simulated ``OUT/<id>/ld_pet.nii.gz`` (+ sidecar)."""
    inputs = table_inputs(table, rows)
    check_out_folder(out_dir)
    inputs.check(out_dir / "subjects.csv", "--out")
    for row in rows:
        if row.ld_pet is None:
            folder = child(out_dir, row.subject_id, "--out", "subject id")
            inputs.check_all([folder / "ld_pet.nii.gz", folder / "ld_pet.json"], "--out")


def guard_simulate_file(sd_pet: Path, mu_map: Path | None, outputs: dict[str, Path | None]) -> None:
    """``simulate --sd-pet``: ``--out``, its JSON sidecar and ``--sd-out`` are new files, never an input."""
    inputs = RunInputs([("--sd-pet", sd_pet), ("--mu-map", mu_map)])
    for option, path in outputs.items():
        if path is not None:
            inputs.check(path, option)
