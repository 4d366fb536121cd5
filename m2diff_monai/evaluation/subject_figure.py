"""The per-subject figure of the report folder (``figures/<subject>.png``), drawn by :mod:`.figures`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2diff_monai.data.grid import mask_box
from m2diff_monai.evaluation.inputs import LD_METHOD, REFERENCE
from m2diff_monai.evaluation.volumes import SubjectVolumes


def _brain_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    box = mask_box(mask, margin)
    if box is None:
        raise ValueError("empty brain mask has no box to draw")
    return box


def write_figure(data: SubjectVolumes, out_png: Path, units: str | None = None) -> Path:
    """LD | methods | SD | |method − SD| per method, three orientations, cropped to the brain (+4 voxels); a
    second set of rows at the full range through the lesions' hottest SD voxel; brain and lesion contours."""
    from m2diff_monai.evaluation.figures import figure_panel
    from m2diff_monai.evaluation.quantitation import UNKNOWN_UNITS, is_lesion

    box = _brain_box(data.mask)
    volumes = {name: v[box] for name, v in data.volumes.items()}
    volumes[REFERENCE] = data.reference[box]
    methods = [m for m in data.volumes if m != LD_METHOD]
    lesions = {name: region[box] for name, region in data.regions.items() if is_lesion(name)}
    return figure_panel(
        volumes,
        out_png,
        error_against=REFERENCE,
        input_key=LD_METHOD,
        error_maps="each" if methods else "first",
        mask=data.mask[box],
        title=f"{data.subject}: LD | {' | '.join(methods) + ' | ' if methods else ''}SD | error maps",
        units=units or UNKNOWN_UNITS,
        contours=lesions,
        full_range=True,
    )


__all__ = ["write_figure"]
