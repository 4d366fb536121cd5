"""Figure panels users look at: one row per orientation, one column per volume, plus error maps.

Columns: every volume in the order given (typically LD | baselines | methods... | SD), then
``|method − reference|`` for the first method (``error_maps="first"``) or for each one (``"each"``). All image
columns share one grey scale [0, 99.5th percentile of the reference], all error maps one hot scale, so columns
compare honestly; colour bars give both scales in the image's units. ``full_range=True`` adds a second set of
rows windowed to [0, the largest value of any volume inside the mask], so a flattened hot lesion does not look
like a kept one under a saturated window. With ``contours`` (e.g. lesion masks) the slices pass through the
reference's hottest voxel inside them, and the reference column shows the brain mask and each contour (legend
below). The first column carries orientation markers (L/R, A/P, I/S). Each panel's title gives PSNR / SSIM of
*that 2D slice* against the reference (data range: the reference volume's peak, inside ``mask`` if given — the
convention of :mod:`m2diff_monai.evaluation.metrics`).

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
    """ "PSNR x / SSIM y" of one 2D slice, or "" when it cannot be scored (tiny slice, no mask voxel)."""
    if min(img.shape) < 7 or (mask is not None and not mask.any()):
        return ""
    scores = per_slice_metrics(img[None], ref[None], mask, data_range, 0, metrics=("psnr", "ssim"))
    if np.isnan(scores["ssim"][0]):
        return f"PSNR {scores['psnr'][0]:.2f}"
    return f"PSNR {scores['psnr'][0]:.2f} / SSIM {scores['ssim'][0]:.3f}"


#: (left, right, bottom, top) labels of a transposed, origin-lower slice of a canonical RAS+ volume.
MARKERS = {"axial": ("L", "R", "P", "A"), "coronal": ("L", "R", "I", "S"), "sagittal": ("P", "A", "I", "S")}
CONTOUR_COLOURS = ("orange", "magenta", "yellow", "red", "deepskyblue")
BRAIN_CONTOUR = "lime"


def _contour_colour(name: str, index: int) -> str:
    lowered = name.lower()
    if "hot" in lowered:
        return "red"
    if "cold" in lowered:
        return "deepskyblue"
    return CONTOUR_COLOURS[index % len(CONTOUR_COLOURS)]


def _hottest_voxel(reference: np.ndarray, contours: Mapping[str, np.ndarray]) -> tuple[int, int, int] | None:
    """Index of the reference's maximum inside the union of ``contours`` (None when they are empty)."""
    union = np.zeros(reference.shape, bool)
    for region in contours.values():
        union |= np.asarray(region, bool)
    if not union.any():
        return None
    masked = np.where(union, reference, -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(masked)), reference.shape))  # type: ignore


def _markers(ax, orientation: str) -> None:
    left, right, bottom, top = MARKERS[orientation]
    style = {"color": "yellow", "fontsize": 7, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)


def _draw_contour(ax, region: np.ndarray, colour: str) -> None:
    if region.any() and not region.all():
        ax.contour(region.T.astype(np.float32), levels=[0.5], colors=[colour], linewidths=0.8, origin="lower")


def _draw_outlines(ax, brain: np.ndarray | None, regions: Mapping[str, np.ndarray]) -> None:
    """Outline the brain mask (when given) and each named region on one reference slice."""
    if brain is not None:
        _draw_contour(ax, brain, BRAIN_CONTOUR)
    for i, (name, region) in enumerate(regions.items()):
        _draw_contour(ax, region, _contour_colour(name, i))


def _outline_legend(fig, brain: bool, regions: Sequence[str], reference: str) -> None:
    """A legend below the panel for the outlines drawn by :func:`_draw_outlines` (none when nothing is outlined)."""
    from matplotlib.lines import Line2D

    handles = ([Line2D([], [], color=BRAIN_CONTOUR, lw=1.2, label="brain mask")] if brain else []) + [
        Line2D([], [], color=_contour_colour(n, i), lw=1.2, label=n) for i, n in enumerate(regions)
    ]
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncol=len(handles),
            fontsize=8,
            title=f"contours on {reference}",
            title_fontsize=8,
            frameon=False,
        )


def _error_map_names(names: Sequence[str], input_key: str, reference: str, error_maps: str) -> list[str]:
    """The volumes that get an error-map column: the first method or each, else the input when there is none."""
    if error_maps not in ("first", "each"):
        raise ValueError(f"error_maps must be 'first' or 'each', got {error_maps!r}")
    methods = [n for n in names if n not in (input_key, reference)]
    if not methods and input_key in names:
        methods = [input_key]
    return methods[:1] if error_maps == "first" else methods


def _panel_arrays(
    volumes: Mapping[str, np.ndarray], error_against: str, contours: Mapping[str, np.ndarray] | None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The volumes as float32 and the contour masks as bool, checked to be 3D on the reference's grid."""
    if error_against not in volumes:
        raise KeyError(f"reference {error_against!r} not among the volumes {list(volumes)}")
    arrays = {name: np.asarray(v, dtype=np.float32) for name, v in volumes.items()}
    reference = arrays[error_against]
    if any(v.shape != reference.shape or v.ndim != 3 for v in arrays.values()):
        raise ValueError(f"volumes must be 3D and share one shape, got {[v.shape for v in arrays.values()]}")
    masks = {name: np.asarray(c, bool) for name, c in (contours or {}).items()}
    if any(c.shape != reference.shape for c in masks.values()):
        raise ValueError("contour masks must share the volumes' shape")
    return arrays, masks


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
    units: str = "a.u. (original units)",
    contours: Mapping[str, np.ndarray] | None = None,
    full_range: bool = False,
) -> Path:
    """Write the comparison panel PNG; returns its path.

    ``volumes``: ordered ``{name: 3D array}`` sharing one shape, including ``error_against`` (the reference).
    Methods are the keys other than ``input_key`` and the reference; error maps are drawn for the first method
    or each (``error_maps``), or for ``input_key`` when there is no method. ``units`` label the colour bars;
    ``contours``: ``{name: 3D mask}`` outlined on the reference column (e.g. lesions); ``full_range``: the
    second set of rows at the full range.
    """
    from matplotlib.figure import Figure

    arrays, contours = _panel_arrays(volumes, error_against, contours)
    reference = arrays[error_against]
    error_names = _error_map_names(list(arrays), input_key, error_against, error_maps)
    dr = resolve_data_range(reference, mask, data_range)
    inside = np.asarray(mask, bool) if mask is not None else np.ones(reference.shape, bool)
    vmax = float(np.percentile(reference[inside], 99.5)) or dr
    errors = {n: np.abs(arrays[n] - reference) for n in error_names}
    emax = max((float(np.percentile(e, 99.5)) for e in errors.values()), default=1.0) or 1.0
    hottest = _hottest_voxel(reference, contours) if slice_index is None and contours else None
    if hottest is not None:
        slice_index = {o: hottest[ORIENTATION_AXIS[o]] for o in orientations}

    windows = [("0–p99.5 SD", vmax)] + ([("0–max SD", dr)] if full_range else [])
    rows = [(o, label, top) for label, top in windows for o in orientations]
    image_names = list(arrays)
    error_titles = [f"|{n} − {error_against}|" for n in error_names]
    n_img, n_err = len(image_names), len(error_titles)
    fig = Figure(
        figsize=(panel_inches * (n_img + n_err) + 1.8, panel_inches * len(rows) + 0.9), dpi=dpi, layout="constrained"
    )
    axes = fig.subplots(len(rows), n_img + n_err, squeeze=False)
    last_image = {}
    last_error = None
    for r, (orientation, window, top) in enumerate(rows):
        axis = ORIENTATION_AXIS[orientation]
        k = _slice_index(slice_index, orientation, reference)
        ref_k = np.take(reference, k, axis=axis)
        mask_k = None if mask is None else np.take(np.asarray(mask, bool), k, axis=axis)[None]
        first_window = r < len(orientations)
        for c, name in enumerate(image_names):
            ax = axes[r, c]
            img = np.take(arrays[name], k, axis=axis)
            last_image[window] = ax.imshow(
                img.T, origin="lower", cmap="gray", vmin=0.0, vmax=top, interpolation="nearest"
            )
            lines = [name] if r in (0, len(orientations)) else []
            if name != error_against and first_window:
                lines.append(_slice_scores(img, ref_k, mask_k, dr))
            if name == error_against:
                _draw_outlines(
                    ax,
                    None if mask is None else np.take(inside, k, axis=axis),
                    {cname: np.take(region, k, axis=axis) for cname, region in contours.items()},
                )
            ax.set_title("\n".join(line for line in lines if line), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{orientation} {k}\n{window}", fontsize=8)
                _markers(ax, orientation)
        for c, name in enumerate(error_names):
            ax = axes[r, n_img + c]
            ax.set_xticks([])
            ax.set_yticks([])
            if not first_window:  # the error maps do not depend on the grey window: drawn once
                ax.set_axis_off()
                continue
            err = np.take(errors[name], k, axis=axis)
            last_error = ax.imshow(err.T, origin="lower", cmap="hot", vmin=0.0, vmax=emax, interpolation="nearest")
            ax.set_title(error_titles[c] if r == 0 else "", fontsize=8)
    for w, (window, _) in enumerate(windows):
        band = axes[w * len(orientations) : (w + 1) * len(orientations), :n_img]
        bar = fig.colorbar(last_image[window], ax=band.ravel().tolist(), shrink=0.8, pad=0.01)
        bar.set_label(f"{units} ({window})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if last_error is not None:
        band = axes[: len(orientations), n_img:]
        bar = fig.colorbar(last_error, ax=band.ravel().tolist(), shrink=0.8, pad=0.01)
        bar.set_label(f"|error| ({units})", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    _outline_legend(fig, mask is not None, list(contours), error_against)
    if title:
        fig.suptitle(
            title
            + ("; slices through the hottest reference voxel in " + ", ".join(contours) if hottest is not None else ""),
            fontsize=10,
        )
    return write_with(out_png, lambda tmp: fig.savefig(tmp, format="png"))
