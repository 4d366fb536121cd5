"""What a preprocessing run is asked to do: :class:`PipelineOptions` (checked on construction) and ``--shard``.

Its own module because the run (:mod:`.pipeline`), one subject's build (:mod:`.subject_build`) and cohort
inference's shards (``m2diff_monai.inference.cohort``, same ``I/N`` spelling) all read it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from m2diff_monai.data.orientation import parse_orientations

from . import crop as crop_stage
from . import spacing as spacing_stage
from .intake import IntakeOptions
from .normalization import cli_method
from .registration import SPACES, normalize_transform_name
from .slices import parse_slices_per_subject
from .split import parse_ratios


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
        if int(self.seed) < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
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
