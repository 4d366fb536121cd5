"""Score one subject: a row of metrics per method (LD first) and, on request, per-slice rows.

One data range per subject: the reference's peak inside the brain mask, used by every method's PSNR, SSIM and
LPIPS (:mod:`.metrics`); the papers' protocol columns come from :mod:`.paper_protocol`, lesion recovery from
:mod:`.quantitation`.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from m2diff_monai.data.grid import mask_box
from m2diff_monai.data.orientation import ORIENTATION_AXIS
from m2diff_monai.evaluation.inputs import EvaluationOptions
from m2diff_monai.evaluation.volumes import SubjectVolumes


def region_metrics(volume: np.ndarray, reference: np.ndarray, regions: Mapping[str, tuple]) -> dict[str, float]:
    """``bias_<r>``, ``mean_pred_<r>``, ``mean_target_<r>`` exactly as :func:`.metrics.evaluate_volume` defines
    them (:func:`.metrics.relative_bias`, NaN for an empty region), computed on each region's bounding box:
    the same voxels, a fraction of the passes over a 256³ volume. ``regions``: ``{name: (mask, box)}``."""
    from m2diff_monai.evaluation.metrics import relative_bias

    row: dict[str, float] = {}
    for name, (region, box) in regions.items():
        if box is None:
            row[f"bias_{name}"] = row[f"mean_pred_{name}"] = row[f"mean_target_{name}"] = float("nan")
            continue
        inside = region[box]
        pred, target = volume[box], reference[box]
        row[f"bias_{name}"] = relative_bias(pred, target, inside)
        row[f"mean_pred_{name}"] = float(np.mean(pred[inside], dtype=np.float64))
        row[f"mean_target_{name}"] = float(np.mean(target[inside], dtype=np.float64))
    return row


def score_subject(
    data: SubjectVolumes,
    options: EvaluationOptions,
    lpips_metric: Any | None,
    workers: int = 2,
) -> tuple[list[dict], list[dict]]:
    """(per-subject rows, per-slice rows) for the LD row and each method.

    The non-learned metrics of the rows run in ``workers`` threads (scipy.ndimage and numpy release the GIL);
    LPIPS runs after them, one row at a time (torch has its own threads)."""
    from m2diff_monai.evaluation import paper_protocol
    from m2diff_monai.evaluation.metrics import evaluate_volume, per_slice_metrics, resolve_data_range
    from m2diff_monai.evaluation.quantitation import lesion_recovery

    data_range = resolve_data_range(data.reference, data.mask)
    regions = {name: (region, mask_box(region)) for name, region in data.regions.items()}
    paper_ref = paper_protocol.prepare_reference(data.reference, data.spacing, options.paper_options())

    def volume_metrics(volume: np.ndarray) -> tuple[dict, dict]:
        row = evaluate_volume(
            volume,
            data.reference,
            data.mask,
            None,
            data.spacing,
            data_range=data_range,
            orientations=options.orientations,
            min_slice_voxels=options.min_slice_voxels,
        )
        row.update(region_metrics(volume, data.reference, regions))
        row.update(paper_protocol.score_volume(volume, paper_ref)[0])
        row.update(lesion_recovery(volume, data.reference, regions))
        per_slice = {}
        if options.per_slice:
            per_slice = {
                o: per_slice_metrics(
                    volume,
                    data.reference,
                    data.mask,
                    data_range,
                    ORIENTATION_AXIS[o],
                    min_slice_voxels=options.min_slice_voxels,
                )
                for o in options.orientations
            }
        return row, per_slice

    methods = list(data.volumes)
    if workers > 1 and len(methods) > 1:
        with ThreadPoolExecutor(max_workers=min(int(workers), len(methods))) as pool:
            results = list(pool.map(volume_metrics, [data.volumes[m] for m in methods]))
    else:
        results = [volume_metrics(data.volumes[m]) for m in methods]

    rows, slice_rows = [], []
    lp_axis = ORIENTATION_AXIS[options.lpips_orientation]
    for method, (row, per_slice) in zip(methods, results, strict=True):
        lp_values = None
        if lpips_metric is not None and getattr(lpips_metric, "available", False):
            lp_values = lpips_metric.slice_values(
                data.volumes[method],
                data.reference,
                data.mask,
                data_range,
                slice_axis=lp_axis,
                min_slice_voxels=options.min_slice_voxels,
            )
        finite = lp_values is not None and np.isfinite(lp_values).any()
        row["lpips"] = float(np.nanmean(lp_values)) if finite else float("nan")
        if lp_values is not None and getattr(lpips_metric, "model", None) is not None:
            row["lpips_paper"] = paper_protocol.lpips_volume(
                data.volumes[method], paper_ref, lpips_metric.model, lpips_metric.device
            )
        rows.append({"subject": data.subject, "method": method, **row})
        for orientation, values in per_slice.items():
            if orientation == options.lpips_orientation and lp_values is not None:
                values["lpips"] = lp_values
            for k in np.flatnonzero(~np.isnan(values["psnr"])):
                slice_rows.append(
                    {
                        "subject": data.subject,
                        "method": method,
                        "orientation": orientation,
                        "slice": int(k),
                        **{m: float(v[k]) for m, v in values.items()},
                    }
                )
    return rows, slice_rows


__all__ = ["region_metrics", "score_subject"]
