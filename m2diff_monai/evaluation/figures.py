"""Figure panels users look at: one row per orientation, one column per volume, plus error maps.

Columns: every volume in the order given (typically LD | methods... | SD), then ``|method − reference|`` for
the first method (``error_maps="first"``) or for each one (``"each"``). All image columns share one grey scale
[0, 99.5th percentile of the reference], all error maps one hot scale, so columns compare honestly. Each panel's
title gives PSNR / SSIM of *that 2D slice* against the reference (data range: the reference volume's peak,
inside ``mask`` if given — the convention of :mod:`m2diff_monai.evaluation.metrics`).

Display convention for canonical RAS+ arrays: slices are transposed and drawn with the origin at the lower left,
so superior/anterior is up and the subject's right is on the right of the image (neurological view).
The PNG is written atomically; matplotlib's object API is used (no pyplot global state, Agg canvas).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2diff_monai.data.orientation import ORIENTATION_AXIS
from m2diff_monai.evaluation.metrics import per_slice_metrics, resolve_data_range
from m2diff_monai.io.atomic import write_with


def _default_slice(reference: np.ndarray, axis: int) -> int:
    """The slice through the reference's centre of mass (the middle one for an empty volume)."""
    weights = np.clip(reference, 0, None).sum(axis=tuple(i for i in range(3) if i != axis), dtype=np.float64)
    if weights.sum() <= 0:
        return reference.shape[axis] // 2
    return int(round(float(np.dot(np.arange(len(weights)), weights) / weights.sum())))


def _slice_index(slice_index, orientation: str, reference: np.ndarray) -> int:
    axis = ORIENTATION_AXIS[orientation]
    if slice_index is None:
        return _default_slice(reference, axis)
    index = int(slice_index[orientation]) if isinstance(slice_index, Mapping) else int(slice_index)
    if not 0 <= index < reference.shape[axis]:
        raise ValueError(f"slice {index} outside 0..{reference.shape[axis] - 1} for {orientation}")
    return index


def _slice_scores(img: np.ndarray, ref: np.ndarray, mask: np.ndarray | None, data_range: float) -> str:
    """"PSNR x / SSIM y" of one 2D slice, or "" when it cannot be scored (tiny slice, no mask voxel)."""
    if min(img.shape) < 7 or (mask is not None and not mask.any()):
        return ""
    scores = per_slice_metrics(img[None], ref[None], mask, data_range, 0, metrics=("psnr", "ssim"))
    if np.isnan(scores["ssim"][0]):
        return f"PSNR {scores['psnr'][0]:.2f}"
    return f"PSNR {scores['psnr'][0]:.2f} / SSIM {scores['ssim'][0]:.3f}"


def figure_panel(
    volumes: Mapping[str, np.ndarray],
    out_png: str | Path,
    error_against: str = "SD",
    orientations: Sequence[str] = ("axial", "coronal", "sagittal"),
    slice_index: int | Mapping[str, int] | None = None,
    *,
    input_key: str = "LD",
    error_maps: str = "first",
    mask: np.ndarray | None = None,
    data_range: float | None = None,
    title: str | None = None,
    panel_inches: float = 2.2,
    dpi: int = 100,
) -> Path:
    """Write the comparison panel PNG; returns its path.

    ``volumes``: ordered ``{name: 3D array}`` sharing one shape, including ``error_against`` (the reference).
    Methods are the keys other than ``input_key`` and the reference; error maps are drawn for the first method
    or each (``error_maps``), or for ``input_key`` when there is no method.
    """
    from matplotlib.figure import Figure

    if error_against not in volumes:
        raise KeyError(f"reference {error_against!r} not among the volumes {list(volumes)}")
    if error_maps not in ("first", "each"):
        raise ValueError(f"error_maps must be 'first' or 'each', got {error_maps!r}")
    arrays = {name: np.asarray(v, dtype=np.float32) for name, v in volumes.items()}
    reference = arrays[error_against]
    if any(v.shape != reference.shape or v.ndim != 3 for v in arrays.values()):
        raise ValueError(f"volumes must be 3D and share one shape, got {[v.shape for v in arrays.values()]}")
    methods = [n for n in arrays if n not in (input_key, error_against)]
    if not methods and input_key in arrays:
        methods = [input_key]
    error_names = methods[:1] if error_maps == "first" else methods
    dr = resolve_data_range(reference, mask, data_range)
    vmax = float(np.percentile(reference[mask] if mask is not None else reference, 99.5)) or dr
    errors = {n: np.abs(arrays[n] - reference) for n in error_names}
    emax = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=1.0) or 1.0

    columns = list(arrays) + [f"|{n} − {error_against}|" for n in error_names]
    rows = list(orientations)
    fig = Figure(figsize=(panel_inches * len(columns), panel_inches * len(rows) + 0.4), dpi=dpi, layout="constrained")
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, orientation in enumerate(rows):
        axis = ORIENTATION_AXIS[orientation]
        k = _slice_index(slice_index, orientation, reference)
        ref_k = np.take(reference, k, axis=axis)
        mask_k = None if mask is None else np.take(np.asarray(mask, bool), k, axis=axis)[None]
        for c, name in enumerate(columns):
            ax = axes[r, c]
            lines = [name] if r == 0 else []
            if c < len(arrays):
                img = np.take(arrays[name], k, axis=axis)
                ax.imshow(img.T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, interpolation="nearest")
                if name != error_against:
                    lines.append(_slice_scores(img, ref_k, mask_k, dr))
            else:
                err = np.take(errors[error_names[c - len(arrays)]], k, axis=axis)
                ax.imshow(err.T, origin="lower", cmap="hot", vmin=0.0, vmax=emax, interpolation="nearest")
            ax.set_title("\n".join(line for line in lines if line), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{orientation} {k}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return write_with(out_png, lambda tmp: fig.savefig(tmp, format="png"))
