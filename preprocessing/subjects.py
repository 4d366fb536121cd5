"""The subjects table (CSV): one row per subject, paths relative to the table.

Parsed with the standard :mod:`csv` module rather than pandas because every value must stay a string (pandas would
turn ``007`` into ``7`` and empty cells into NaN) and error messages need the file's line numbers.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from m2diff_monai.data.manifest import SPLITS
from m2diff_monai.errors import InputError
from m2diff_monai.io.safety import SAFE_NAME

PATH_COLUMNS: tuple[str, ...] = ("ld_pet", "sd_pet", "mri")
REQUIRED_COLUMNS: tuple[str, ...] = ("subject_id", *PATH_COLUMNS)
MASK_PREFIX = "mask_"
ID_PATTERN = SAFE_NAME  # ids name folders: the one safe-name rule of m2diff_monai.io.safety


@dataclass(frozen=True)
class SubjectRow:
    """One validated row. Paths are absolute; ``None`` marks an empty cell (``mri=None``: MRI-free subject)."""

    subject_id: str
    ld_pet: Path | None
    sd_pet: Path | None
    mri: Path | None
    split: str | None = None
    drf: float | None = None
    masks: dict[str, Path] = field(default_factory=dict)

    def files(self) -> dict[str, Path]:
        """Every listed file by role (``ld_pet``, ``sd_pet``, ``mri``, ``mask_<name>``), in table order."""
        out = {role: getattr(self, role) for role in PATH_COLUMNS if getattr(self, role) is not None}
        out.update({f"{MASK_PREFIX}{name}": p for name, p in self.masks.items()})
        return out


def read_subjects(
    csv_path: str | Path, require: Sequence[str] = ("ld_pet",), problems: dict[str, InputError] | None = None
) -> list[SubjectRow]:
    """Read and check a subjects table.

    Columns ``subject_id``, ``ld_pet``, ``sd_pet``, ``mri`` must be present (a misspelt ``mri`` column would
    otherwise silently make every subject MRI-free); ``split``, ``drf`` and ``mask_<name>`` are optional; any
    other column is ignored. ``require`` names the path columns that must be non-empty in every row.
    Raises :class:`InputError` naming the table line, the subject and the file for the first problem found.

    ``problems``: when a dict is given, a problem of one subject's cells (a listed file that is missing or not a
    file, an empty required cell, a bad ``split`` or ``drf``) is stored there under the subject id instead of
    raised, and that subject's row is returned unchecked (for ``--keep-going``: the subject fails alone, and the
    split of the others does not move). Problems of the table itself (columns, field counts, empty, unsafe or
    duplicate ids) are always raised.
    """
    bad_require = [c for c in require if c not in PATH_COLUMNS]
    if bad_require:
        raise ValueError(f"require must name path columns {PATH_COLUMNS}, got {bad_require}")
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise InputError("subjects table does not exist", path=csv_path)
    if not csv_path.is_file():
        raise InputError("subjects table is not a file", path=csv_path)
    base = csv_path.resolve().parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            return _parse(csv.reader(fh), csv_path, base, tuple(require), problems)
    except UnicodeDecodeError as err:
        raise InputError(f"subjects table is not UTF-8 text ({err.reason})", path=csv_path) from None
    except csv.Error as err:
        raise InputError(f"subjects table is not valid CSV ({err})", path=csv_path) from None


def _header(reader, csv_path: Path) -> tuple[list[str], list[str]]:
    """The checked header: all column names, and the ``mask_<name>`` ones."""
    header = next(reader, None)
    while header is not None and not any(c.strip() for c in header):
        header = next(reader, None)
    if header is None:
        raise InputError(
            "subjects table is empty (expected a header line with subject_id,ld_pet,sd_pet,mri)", path=csv_path
        )
    columns = [c.strip() for c in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(
            f"subjects table lacks column(s) {', '.join(missing)} (found: {', '.join(columns) or 'none'}); "
            f"required: {', '.join(REQUIRED_COLUMNS)}",
            path=csv_path,
        )
    duplicated = sorted({c for c in columns if c and columns.count(c) > 1})
    if duplicated:
        raise InputError(f"subjects table has duplicate column(s) {', '.join(duplicated)}", path=csv_path)
    mask_columns = [c for c in columns if c.startswith(MASK_PREFIX)]
    for col in mask_columns:
        if not ID_PATTERN.fullmatch(col[len(MASK_PREFIX) :]):
            raise InputError(
                f"mask column {col!r} needs a name of letters, digits, '-' or '_' after 'mask_'", path=csv_path
            )
    return columns, mask_columns


def _parse(
    reader, csv_path: Path, base: Path, require: tuple[str, ...], problems: dict[str, InputError] | None = None
) -> list[SubjectRow]:
    columns, mask_columns = _header(reader, csv_path)
    rows: list[SubjectRow] = []
    first_line: dict[str, int] = {}
    folded: dict[str, str] = {}  # casefolded id -> id as written
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        where = f"{csv_path.name} line {line}"
        if len(values) > len(columns):
            raise InputError(f"{where} has {len(values)} fields but the header has {len(columns)}", path=csv_path)
        cells = {c: v.strip() for c, v in zip(columns, values, strict=False)}  # a short row lacks its last cells
        subject_id = cells.get("subject_id", "")
        if not subject_id:
            raise InputError(f"{where}: empty subject_id", path=csv_path)
        if not ID_PATTERN.fullmatch(subject_id):
            raise InputError(
                f"{where}: subject_id {subject_id!r} may contain only letters, digits, '-' and '_'", path=csv_path
            )
        if subject_id in first_line:
            raise InputError(
                f"{where}: duplicate subject_id {subject_id!r} (first on line {first_line[subject_id]})",
                subject=subject_id,
                path=csv_path,
            )
        twin = folded.get(subject_id.casefold())
        if twin is not None:
            raise InputError(
                f"{where}: subject_id {subject_id!r} differs from {twin!r} (line {first_line[twin]}) only "
                "in case; both would use one folder on a case-insensitive file system",
                subject=subject_id,
                path=csv_path,
            )
        first_line[subject_id] = line
        folded[subject_id.casefold()] = subject_id

        try:
            rows.append(_row(cells, mask_columns, base, where, subject_id, require, csv_path))
        except InputError as err:
            if problems is None:
                raise
            problems[subject_id] = err
            rows.append(_unchecked_row(cells, base, subject_id))
    if not rows:
        raise InputError("subjects table has a header but no subjects", path=csv_path)
    return rows


def _row(
    cells: dict[str, str],
    mask_columns: list[str],
    base: Path,
    where: str,
    subject_id: str,
    require: tuple[str, ...],
    csv_path: Path,
) -> SubjectRow:
    paths = {}
    for col in PATH_COLUMNS:
        paths[col] = _path_cell(cells.get(col, ""), col, base, where, subject_id, col in require, csv_path)
    masks = {}
    for col in mask_columns:
        p = _path_cell(cells.get(col, ""), col, base, where, subject_id, False, csv_path)
        if p is not None:
            masks[col[len(MASK_PREFIX) :]] = p

    split = cells.get("split", "").lower() or None
    if split is not None and split not in SPLITS:
        raise InputError(
            f"{where}: split {cells['split']!r} is not one of {'|'.join(SPLITS)} (or empty)",
            subject=subject_id,
            path=csv_path,
        )
    drf = _drf_cell(cells.get("drf", ""), where, subject_id, csv_path)
    return SubjectRow(subject_id, paths["ld_pet"], paths["sd_pet"], paths["mri"], split, drf, masks)


def _unchecked_row(cells: dict[str, str], base: Path, subject_id: str) -> SubjectRow:
    """A failed subject's row as written (no file checked): only its split and whether it has a target count."""

    def path(col: str) -> Path | None:
        value = cells.get(col, "")
        return (base / Path(value).expanduser()) if value else None

    split = cells.get("split", "").lower()
    return SubjectRow(subject_id, path("ld_pet"), path("sd_pet"), path("mri"), split if split in SPLITS else None)


def _path_cell(
    value: str, column: str, base: Path, where: str, subject_id: str, required: bool, csv_path: Path
) -> Path | None:
    if not value:
        if required:
            raise InputError(f"{where}: column {column} is empty but required here", subject=subject_id, path=csv_path)
        return None
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.exists():
        raise InputError(f"{column} listed on {where} does not exist", subject=subject_id, path=path)
    if not path.is_file():
        raise InputError(f"{column} listed on {where} is not a file", subject=subject_id, path=path)
    return path


def _drf_cell(value: str, where: str, subject_id: str, csv_path: Path) -> float | None:
    if not value:
        return None
    try:
        drf = float(value)
    except ValueError:
        drf = math.nan
    if not math.isfinite(drf) or drf <= 0:
        raise InputError(
            f"{where}: drf {value!r} must be a positive number (dose reduction factor, e.g. 4)",
            subject=subject_id,
            path=csv_path,
        )
    return drf
