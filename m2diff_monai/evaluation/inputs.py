"""What an evaluation run is asked to do: its options, the method ↔ prediction-folder maps, where each
subject's prediction file is, and which subjects can be scored (the :class:`Plan`), all decided before any
volume is read.

Predictions are looked up as ``DIR/<subject>.nii.gz`` (or ``.nii``): the names ``m2diff-infer --manifest ...
--out-dir DIR`` writes. ``LD`` and ``SD`` are reserved method names (the input row and the reference).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2diff_monai.data.manifest import canonical_split, item_path
from m2diff_monai.data.orientation import ORIENTATION_AXIS, ORIENTATIONS, parse_orientations
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety

TOOL = "m2diff-evaluate"
LD_METHOD = "LD"
REFERENCE = "SD"
PRED_SUFFIXES = (".nii.gz", ".nii")
SPACES = ("native", "preprocessed")
METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class EvaluationOptions:
    """Everything that changes the numbers or the files written (recorded in ``run.json``)."""

    split: str = "test"
    space: str = "native"
    subjects: tuple[str, ...] | None = None
    per_slice: bool = False
    lpips: bool = True
    lpips_weights: str | None = None
    lpips_orientation: str = "axial"
    figures: bool = True
    orientations: tuple[str, ...] = ORIENTATIONS
    min_slice_voxels: int = 16
    keep_going: bool = False
    progress: bool = True
    workers: int = 2
    paper_scaling: str = "reference"  # the papers' protocol (paper_protocol.PaperOptions)
    paper_pad: int = 256
    paper_min_size: int | None = None
    baselines: tuple[str, ...] = ()
    floor_fwhm: float | None = None  # the LD consistency's floor as a reference row (consistency_floor.py)
    subsets: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, subject-id patterns): subsets.py
    targets: Any = "default"  # acceptance targets (targets.py): a dict after parsing, None = off

    def __post_init__(self) -> None:
        canonical_split(self.split, allow_all=True)
        if self.space not in SPACES:
            raise InputError(f"unknown evaluation space {self.space!r}; choose native or preprocessed")
        try:
            object.__setattr__(self, "orientations", parse_orientations(self.orientations))
        except ValueError as err:
            raise InputError(str(err)) from None
        if self.lpips_orientation not in ORIENTATION_AXIS:
            raise InputError(f"unknown LPIPS orientation {self.lpips_orientation!r}")
        if int(self.min_slice_voxels) < 1:
            raise InputError("min_slice_voxels must be >= 1")
        if int(self.workers) < 1:
            raise InputError("workers must be >= 1")
        try:
            self.paper_options()
        except ValueError as err:
            raise InputError(str(err)) from None
        if self.subjects is not None:
            object.__setattr__(self, "subjects", tuple(str(s) for s in self.subjects))
        from m2diff_monai.evaluation.baselines import parse_baselines

        object.__setattr__(self, "baselines", parse_baselines(self.baselines))
        if self.floor_fwhm is not None:
            fwhm = float(self.floor_fwhm)
            if not math.isfinite(fwhm) or fwhm <= 0:
                raise InputError(f"--floor-fwhm must be a positive FWHM in mm, got {self.floor_fwhm!r}")
            object.__setattr__(self, "floor_fwhm", fwhm)
        from m2diff_monai.evaluation.subsets import parse_subsets

        object.__setattr__(self, "subsets", parse_subsets(self.subsets))
        from m2diff_monai.evaluation.targets import parse_targets

        object.__setattr__(self, "targets", parse_targets(self.targets))

    def paper_options(self):
        from m2diff_monai.evaluation.paper_protocol import PaperOptions

        return PaperOptions(scaling=self.paper_scaling, pad_to=int(self.paper_pad), min_size=self.paper_min_size)

    def as_dict(self) -> dict[str, Any]:
        record = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        record["subsets"] = {name: list(patterns) for name, patterns in self.subsets}
        return record


def parse_method_map(values: Mapping[str, Any] | Sequence[str] | str | None, what: str) -> dict[str, str]:
    """``{"M2Diff": "dir"}``, ``["M2Diff=dir", ...]`` or ``"M2Diff=dir,IDDPM=dir2"`` → ordered dict.

    Method names: letters, digits and ``_.+-``; ``LD``/``SD`` are reserved (the input and the reference)."""
    if values is None or values == "" or values == {}:
        return {}
    if isinstance(values, Mapping):
        pairs = [(str(k), str(v)) for k, v in values.items()]
    else:
        items = [v for v in (values.split(",") if isinstance(values, str) else values) if str(v).strip()]
        pairs = []
        for item in items:
            name, sep, value = str(item).partition("=")
            if not sep or not name.strip() or not value.strip():
                raise InputError(f"{what} must be METHOD=PATH, got {item!r}")
            pairs.append((name.strip(), value.strip()))
    out: dict[str, str] = {}
    for name, value in pairs:
        if not METHOD_NAME.match(name):
            raise InputError(f"{what}: method name {name!r} must use letters, digits and _ . + - only")
        if name.upper() in (LD_METHOD, REFERENCE):
            raise InputError(f"{what}: method name {name!r} is reserved (LD is the input row, SD the reference)")
        if name in out:
            raise InputError(f"{what}: method {name!r} given twice")
        out[name] = value
    return out


def prediction_path(pred_dir: str | Path, subject: str) -> Path | None:
    """``DIR/<subject>.nii.gz`` or ``DIR/<subject>.nii`` (m2diff-infer's cohort naming), None when absent.
    ``subject`` must be a safe name (InputError otherwise): a prediction is never read from outside ``DIR``."""
    safety.check_name(subject, "subject id")
    for suffix in PRED_SUFFIXES:
        candidate = Path(pred_dir) / f"{subject}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def has_reference(item: dict, base: Path) -> bool:
    """Whether the item has an SD reference file to score against (the source SD PET or the preprocessed cube)."""
    return any(
        item_path(base, item.get(k)) is not None and item_path(base, item.get(k)).is_file()
        for k in ("source_sd_pet", "sd_pet")
    )


@dataclass
class Plan:
    """Which subjects are scored with which files; decided before any heavy work."""

    items: list[dict]
    files: dict[str, dict[str, Path]]  # subject → method → prediction file
    skipped: dict[str, str]  # subject → why (no reference, or missing prediction under keep_going)
    failed: dict[str, str] = field(default_factory=dict)


def plan_subjects(items: list[dict], base: Path, pred_dirs: Mapping[str, Path], keep_going: bool) -> Plan:
    """Every subject needs an SD reference (else skipped, noted) and a prediction from every method (else an
    :class:`InputError` naming the subject and the file looked for; skipped under ``keep_going``)."""
    plan = Plan(items=[], files={}, skipped={})
    for item in items:
        sid = str(item.get("subject"))
        if not has_reference(item, base):
            plan.skipped[sid] = "no standard-dose reference (source_sd_pet / sd_pet) in the manifest"
            continue
        files: dict[str, Path] = {}
        for method, folder in pred_dirs.items():
            found = prediction_path(folder, sid)
            if found is None:
                err = InputError(
                    f"no {method} prediction (looked for {sid}.nii.gz or {sid}.nii in {folder})",
                    subject=sid,
                    path=Path(folder) / f"{sid}.nii.gz",
                )
                if not keep_going:
                    raise err
                plan.failed[sid] = err.line()
                break
            files[method] = found
        else:
            plan.items.append(item)
            plan.files[sid] = files
    return plan


__all__ = [
    "LD_METHOD",
    "REFERENCE",
    "SPACES",
    "TOOL",
    "EvaluationOptions",
    "Plan",
    "has_reference",
    "item_path",
    "parse_method_map",
    "plan_subjects",
    "prediction_path",
]
