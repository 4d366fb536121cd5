"""``m2diff-preprocess run``: subjects table → registered, normalized cubes, 2D slices, QC and a MONAI manifest.

Per subject (stages 2–9, :mod:`.subject_build`): resampling to the run's one voxel size (:mod:`.spacing`) →
registration (:mod:`.registration`) → brain mask (:mod:`.mask`) → normalization
(:mod:`.normalization`) → crop/pad (:mod:`.crop`) → slices (:mod:`.slices`) → QC montage (:mod:`.qc`) →
``subject.json``. Per run (here): split (:mod:`.split`), manifest (:mod:`.manifest`), QC summary; the options
are :class:`~preprocessing.options.PipelineOptions`; the ``run`` subcommand's arguments are at the end.

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
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.runtime import ITK_REPRODUCIBLE_THREADS, ITK_THREADS_VARIABLE, allowed_threads

from . import manifest as manifest_stage
from . import outputs as output_guard
from . import qc as qc_stage
from . import spacing as spacing_stage
from .intake import IntakeOptions, load_subject
from .normalization import METHODS, cli_method
from .options import PipelineOptions
from .registration import SPACES
from .split import assign_splits
from .subject_build import inputs_fingerprint, process_subject
from .subjects import SubjectRow, read_subjects


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


# ---------------------------------------------------------------------------------------------------- run
def _select_shard(rows: list[SubjectRow], shard: tuple[int, int] | None) -> list[SubjectRow]:
    ordered = sorted(rows, key=lambda r: r.subject_id)
    if shard is None:
        return ordered
    i, n = shard
    return [r for pos, r in enumerate(ordered) if pos % n == i - 1]


def _existing_record(
    final: Path, row: SubjectRow, options: PipelineOptions, changed: dict[str, list[str]] | None = None
) -> dict | None:
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
    stale = safety.stale_roles(record.get("inputs"), inputs_fingerprint(row))
    if stale:
        if changed is not None:
            changed[row.subject_id] = stale
        return None
    files = record.get("files", {})
    needed = [files.get(k) for k in ("ld_pet", "sd_pet", "mri", "brain_mask") if files.get(k)]
    if not all((final / f).is_file() for f in needed):
        return None
    return record


def _init_worker(threads: int, itk_threads: str) -> None:
    os.environ[ITK_THREADS_VARIABLE] = itk_threads
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
        line = f"subject {row.subject_id}: internal error: {type(err).__name__}: {err}\n{detail}"
        return row.subject_id, None, line, False


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
        grid_files = [
            r.ld_pet if options.space == "pet" else r.mri for r in rows if r.subject_id not in (problems or {})
        ]
        options = replace(options, cohort_spacing=spacing_stage.resolve_target(spacing_stage.AUTO, grid_files))
    suffix = f"_shard-{options.shard[0]}-of-{options.shard[1]}" if options.shard else ""
    output_guard.guard_run(
        subjects_csv,
        rows,
        _select_shard(rows, options.shard),
        out_dir,
        manifest_path,
        [f"summary{suffix}.csv", f"summary{suffix}.md"],
    )
    lock_name = f".m2diff-preprocess{suffix.replace('_', '.')}.lock"
    with safety.output_lock(out_dir, "m2diff-preprocess", "--out", lock_name):
        return _run_locked(rows, problems or {}, subjects_csv, out_dir, manifest_path, options)


def _run_locked(
    rows: list[SubjectRow],
    problems: dict[str, InputError],
    subjects_csv: Path,
    out_dir: Path,
    manifest_path: Path,
    options: PipelineOptions,
) -> RunSummary:
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
            fail(
                sid,
                InputError(
                    f"split {splits[sid]!r} needs a standard-dose PET, but sd_pet is empty",
                    subject=sid,
                    path=subjects_csv,
                ).line(),
                True,
            )
            continue
        record = _existing_record(out_dir / "subjects" / sid, row, options, summary.changed)
        if record is not None:
            records[sid] = record
            summary.skipped.append(sid)
        else:
            todo.append(row)

    bar = tqdm(total=len(todo), desc="subjects", unit="subject", disable=None)

    def take(result: tuple) -> None:
        """One subject's outcome (from :func:`_run_one`, here or in a worker): recorded, or failed."""
        sid, record, line, is_input = result
        bar.update(1)
        if record is None:
            fail(sid, line or "failed", is_input)
        else:
            records[sid] = record
            summary.processed.append(sid)

    try:
        if options.workers == 1 or len(todo) <= 1:
            for row in todo:
                take(_run_one(row, out_dir, options))
        else:
            _run_parallel(todo, out_dir, options, take)
            summary.processed.sort()
    finally:
        bar.close()

    done = sorted(records)
    qc_dir = out_dir / "qc"
    suffix = f"_shard-{options.shard[0]}-of-{options.shard[1]}" if options.shard else ""
    rows_out = [
        qc_stage.summary_row(sid, "skipped" if sid in summary.skipped else "processed", splits[sid], records[sid])
        for sid in done
    ]
    rows_out += [
        qc_stage.summary_row(sid, "failed", splits.get(sid, ""), error=msg.splitlines()[0])
        for sid, msg in sorted(summary.failed.items())
    ]
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


def _run_parallel(todo, out_dir, options, take) -> None:
    """:func:`_run_one` for each row of ``todo`` in worker processes; ``take`` gets each result as it finishes."""
    threads = max(1, allowed_threads()[0] // options.workers)  # CPUs we may use, not all visible
    # ITK: the parent's choice (one thread, i.e. reproducible registration, unless the user set the variable)
    itk_threads = os.environ.get(ITK_THREADS_VARIABLE) or str(ITK_REPRODUCIBLE_THREADS)
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold ITK/OpenMP threads
    with ProcessPoolExecutor(
        options.workers, mp_context=context, initializer=_init_worker, initargs=(threads, itk_threads)
    ) as pool:
        pending = {pool.submit(_run_one, row, out_dir, options) for row in todo}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    take(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# ---------------------------------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``run`` options to ``parser`` (called by :mod:`preprocessing.cli`)."""
    d = PipelineOptions()
    parser.add_argument("--subjects", required=True, type=Path, help="subjects table (CSV)")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (subjects/<id>/, qc/); refused before any work when a folder it would "
        "replace holds an input, or while another run writes to it (docs/safety.md)",
    )
    parser.add_argument(
        "--manifest",
        required=True,
        type=Path,
        help="manifest to write, e.g. data_manifests/NAME.json (never the table or an input)",
    )
    parser.add_argument("--transform", default=d.transform, help="SyN (paper, default) | affine | rigid")
    parser.add_argument(
        "--space",
        default=d.space,
        choices=SPACES,
        help="pet: T1 resampled on the PET grid (default); mri: PET resampled on the T1 grid",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=d.size,
        help="cube edge in voxels at the target --spacing, a multiple of 16 (default 256)",
    )
    parser.add_argument(
        "--spacing",
        default=d.spacing,
        help="voxel size every subject is resampled to: auto (default: the cohort's per-axis median), "
        "X or X,Y,Z in mm (RAS axes), or native (no resampling)",
    )
    parser.add_argument("--orientations", default=",".join(d.orientations), help="comma list of axial,coronal,sagittal")
    parser.add_argument(
        "--slices-per-subject",
        default="all",
        help="'all' brain slices (default) or N slices uniformly across the brain's extent",
    )
    parser.add_argument(
        "--split",
        default=",".join(str(r) for r in d.split),
        help="train,val,test ratios for subjects without a split column (default 0.8,0.1,0.1)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the split shuffle and of ANTs sampling")
    parser.add_argument(
        "--normalization",
        default=d.normalization,
        type=cli_method,
        metavar="|".join(METHODS),
        help="shared: one LD-derived scale for LD and SD (default); volume: per-volume min-max; "
        "slice: every 2D slice min-max on its own (the official M2Diff loader)",
    )
    parser.add_argument("--workers", type=int, default=d.workers, help="subjects processed in parallel processes")
    parser.add_argument(
        "--shard", default=None, help="I/N (1-based): process only the id-sorted subjects with index %% N == I-1"
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="report bad subjects (a bad table row too) and finish the others (exit 1); table "
        "structure errors still stop the run",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="redo subjects even when their outputs are up to date (replaces only this tool's "
        "subject folders; never an input: see docs/safety.md)",
    )
    parser.add_argument("--frame", type=int, default=None, help="0-based frame of a 4D PET to use")
    parser.add_argument("--sum-frames", action="store_true", help="sum the frames of a 4D PET")
    parser.add_argument(
        "--qform-policy",
        default="warn",
        choices=("warn", "reject"),
        help="when qform and sform disagree: warn (use the sform) or reject the subject",
    )
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
    """``m2diff-preprocess run``: 0 on success, 1 when --keep-going skipped some. Bad options and bad input raise
    :class:`InputError`, which :func:`m2diff_monai.cli_runner.run_cli` reports in one line with exit 2."""
    try:
        options = options_from_args(args)
    except ValueError as err:
        raise InputError(str(err)) from None
    summary = run_pipeline(args.subjects, args.out, args.manifest, options)
    for line in summary.failed.values():
        print(line, file=sys.stderr)
    for sid, roles in summary.changed.items():
        print(f"subject {sid}: {', '.join(roles)} changed since its last run; redone", file=sys.stderr)
    print(
        f"processed {len(summary.processed)}, skipped {len(summary.skipped)} (up to date), "
        f"failed {len(summary.failed)}; "
        f"manifest {summary.manifest}; QC summary {summary.qc_summary}"
    )
    return summary.exit_code


if __name__ == "__main__":  # the same as `m2diff-preprocess run ...`, through the one CLI runner
    from preprocessing.cli import main as preprocess_main

    raise SystemExit(preprocess_main(["run", *sys.argv[1:]]))
