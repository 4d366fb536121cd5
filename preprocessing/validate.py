"""``m2diff-preprocess validate``: check a subjects table and every file it lists, write nothing (but ``--csv``)."""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from m2diff_monai.cli_runner import print_error
from m2diff_monai.io.atomic import save_text
from preprocessing.intake import IntakeOptions, validate_subjects
from preprocessing.subjects import PATH_COLUMNS, read_subjects

COLUMNS = ("subject", "file", "level", "message")


def add_intake_arguments(parser: argparse.ArgumentParser) -> None:
    """The intake options, shared by every subcommand that reads raw subjects (``validate``, ``run``)."""
    frames = parser.add_mutually_exclusive_group()
    frames.add_argument(
        "--frame", type=_frame_index, metavar="N", help="4D PET: use frame N (0-based); 3D files ignore it"
    )
    frames.add_argument("--sum-frames", action="store_true", help="4D PET: use the sum of all frames")
    parser.add_argument(
        "--qform-policy",
        choices=("warn", "reject"),
        default="warn",
        help="when a file's qform and sform disagree: use the sform and warn (default), or refuse",
    )
    parser.add_argument(
        "--min-overlap",
        type=_fraction,
        default=0.5,
        metavar="F",
        help="least fraction of the PET's object inside the MRI's field of view (default 0.5)",
    )


def intake_options(args: argparse.Namespace) -> IntakeOptions:
    """The :class:`IntakeOptions` of parsed :func:`add_intake_arguments` options."""
    return IntakeOptions(
        frame=args.frame, sum_frames=args.sum_frames, qform_policy=args.qform_policy, min_overlap=args.min_overlap
    )


def _frame_index(value: str) -> int:
    try:
        frame = int(value)
    except ValueError:
        frame = -1
    if frame < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a frame number (0, 1, 2, ...)")
    return frame


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number between 0 and 1")
    return fraction


def parse_require(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in PATH_COLUMNS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown column(s) {', '.join(bad)}; choose from {', '.join(PATH_COLUMNS)}")
    return names


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", required=True, type=Path, metavar="S.csv", help="subjects table")
    add_intake_arguments(parser)
    parser.add_argument(
        "--require",
        type=parse_require,
        default=("ld_pet",),
        metavar="COLS",
        help="path columns that must be filled in every row, comma-separated "
        "(default ld_pet; use sd_pet for a table that 'simulate' completes, '' for none)",
    )
    parser.add_argument("--csv", type=Path, metavar="OUT.csv", help="also write the findings to this CSV file")


def main(args: argparse.Namespace) -> int:
    options = intake_options(args)
    rows = read_subjects(args.subjects, require=args.require)
    findings = []
    for row in _progress(rows):
        findings.extend(validate_subjects([row], options))

    base = args.subjects.resolve().parent
    table = [(f.subject, _short(f.file, base), f.level, f.message) for f in findings]
    print(format_table(COLUMNS, table))
    if args.csv is not None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows((f.subject, f.file, f.level, f.message) for f in findings)
        save_text(args.csv, buffer.getvalue())

    failing: dict[str, str] = {}
    for f in findings:
        if f.level == "error" and f.subject not in failing:
            failing[f.subject] = (
                f"subject {f.subject}, file {f.file}: {f.message}" if f.file else f"subject {f.subject}: {f.message}"
            )
    n_warn = sum(f.level == "warning" for f in findings)
    print(f"{len(rows)} subject(s), {len(rows) - len(failing)} valid, {len(failing)} with errors, {n_warn} warning(s)")
    for line in failing.values():
        print_error("m2diff-preprocess", line)
    return 2 if failing else 0


def format_table(columns, rows) -> str:
    """Plain left-aligned text table (no tabulate dependency); messages are never truncated."""
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
    widths[-1] = 0  # last column unpadded
    lines = [
        "  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in [columns, *rows]
    ]
    lines.insert(1, "  ".join("-" * max(w, len(c)) for w, c in zip(widths, columns, strict=True)))
    return "\n".join(lines)


def _short(file: str, base: Path) -> str:
    """Paths under the table's folder are shown relative to it; the CSV output keeps absolute paths."""
    if not file:
        return "(across files)"
    try:
        return Path(file).relative_to(base).as_posix()
    except ValueError:
        return file


def _progress(rows):
    from tqdm import tqdm

    return tqdm(rows, desc="validate", unit="subject", disable=None, file=sys.stderr)
