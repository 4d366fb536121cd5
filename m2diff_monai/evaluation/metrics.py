"""Image-quality metrics for predicted PET volumes against the standard-dose reference.

Definitions (each function takes them as explicit arguments; docs/fusion-and-metrics.md has the rationale):

- **Data range** (PSNR peak, SSIM constants): ``data_range`` if given, else the *peak of the target* inside the
  evaluated region (``target[mask].max()``, or ``target.max()`` without a mask). PET is non-negative, so this is
  the width of ``[0, peak]``; on the paper's [0, 1]-normalised data it is ~1. Assumption: the official code's
  exact choice is not recorded in notes/facts.md; a fixed, reference-derived range keeps PSNR comparable across
  methods evaluated against the same target. 2D per-slice metrics reuse the *volume's* range, so a dim slice is
  not flattered by a small peak.
- **Masked metrics** (the official code evaluates inside a brain mask, notes/facts.md §1): PSNR/NMSE/bias use the
  voxels inside the mask. **Masked SSIM** is the full SSIM map (computed on the whole image, as skimage does)
  averaged over the mask voxels that are at least ``(win_size - 1) // 2`` away from the image border — the
  same border skimage crops — so with an all-true mask it equals ``skimage.metrics.structural_similarity``.
- **SSIM** matches ``skimage.metrics.structural_similarity``: uniform 7-wide window with sample covariance by
  default; ``gaussian_weights=True`` gives skimage's 11-tap Gaussian (σ 1.5, truncate 3.5). Here ``axes``
  restricts the window to some axes, which is how 2D per-slice SSIM of a volume is vectorised.
- **NMSE** = Σ(p − t)² / Σ t² (official code), **relative bias** = (mean p − mean t) / mean t.

Written here rather than taken from MONAI/skimage because both lack masked SSIM maps averaged over a mask and
vectorised per-slice 2D metrics over a volume (skimage loops per call; MONAI's SSIMMetric has no mask).
Float32 inputs are computed in float32 (as skimage does); means are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from m2diff_monai.data.grid import mask_box
from m2diff_monai.data.orientation import ORIENTATION_AXIS, ORIENTATIONS


def _float(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype in (np.float32, np.float64) else a.astype(np.float64)


def _check_pair(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None) -> tuple:
    pred, target = _float(pred), _float(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if mask is not None:
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != target.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {target.shape}")
        if not mask.any():
            raise ValueError("mask is empty")
    return pred, target, mask


def resolve_data_range(target: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None) -> float:
    """``data_range`` if given, else the target's peak inside ``mask`` (whole array without one)."""
    if data_range is not None:
        if not data_range > 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        return float(data_range)
    values = np.asarray(target)[np.asarray(mask, dtype=bool)] if mask is not None else np.asarray(target)
    peak = float(values.max()) if values.size else 0.0
    if not peak > 0:
        raise ValueError("cannot derive a data range: the target has no positive value in the evaluated region")
    return peak


def mse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    pred, target, mask = _check_pair(pred, target, mask)
    diff = pred - target
    if mask is not None:
        diff = diff[mask]
    return float(np.mean(np.square(diff, dtype=np.float64)))


def psnr(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, data_range: float | None = None
) -> float:
    """10·log10(data_range² / MSE) over ``mask``; ``inf`` for a perfect prediction."""
    pred, target, mask = _check_pair(pred, target, mask)
    dr = resolve_data_range(target, mask, data_range)
    err = mse(pred, target, mask)
    return float("inf") if err == 0 else float(10.0 * np.log10(dr**2 / err))


def nmse(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Σ(p − t)² / Σ t² over ``mask`` (= mean((p − t)²) / mean(t²), the official code's NMSE)."""
    pred, target, mask = _check_pair(pred, target, mask)
    if mask is not None:
        pred, target = pred[mask], target[mask]
    denom = float(np.sum(np.square(target, dtype=np.float64)))
    if denom == 0:
        raise ValueError("NMSE undefined: the target is zero in the evaluated region")
    return float(np.sum(np.square(pred - target, dtype=np.float64)) / denom)


def relative_bias(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """(mean p − mean t) / mean t over ``mask``: negative when a method underestimates uptake."""
    pred, target, mask = _check_pair(pred, target, mask)
    if mask is not None:
        pred, target = pred[mask], target[mask]
    mean_t = float(np.mean(target, dtype=np.float64))
    if mean_t == 0:
        raise ValueError("relative bias undefined: the target's mean is zero in the evaluated region")
    return float((np.mean(pred, dtype=np.float64) - mean_t) / mean_t)


def ssim_map(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float,
    *,
    axes: Sequence[int] | None = None,
    win_size: int | None = None,
    gaussian_weights: bool = False,
    sigma: float = 1.5,
    use_sample_covariance: bool = True,
    K1: float = 0.01,
    K2: float = 0.03,
) -> tuple[np.ndarray, int]:
    """The SSIM map (same shape as the inputs) and the border width skimage crops before averaging.

    ``axes``: the axes the window spans (default all); the other axes are independent images (e.g. the
    slices of a volume for 2D per-slice SSIM). Defaults reproduce skimage's ``structural_similarity``.
    """
    pred, target, _ = _check_pair(pred, target, None)
    dtype = np.float32 if (pred.dtype == np.float32 and target.dtype == np.float32) else np.float64
    x, y = pred.astype(dtype, copy=False), target.astype(dtype, copy=False)
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) % x.ndim for a in axes)
    truncate = 3.5
    if win_size is None:
        win_size = 2 * int(truncate * sigma + 0.5) + 1 if gaussian_weights else 7
    if win_size % 2 != 1:
        raise ValueError("win_size must be odd")
    if any(x.shape[a] < win_size for a in axes):
        raise ValueError(f"win_size {win_size} exceeds the image extent {[x.shape[a] for a in axes]}")

    if gaussian_weights:

        def smooth(img: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(img, sigma=sigma, truncate=truncate, mode="reflect", axes=axes)
    else:

        def smooth(img: np.ndarray) -> np.ndarray:
            return ndimage.uniform_filter(img, size=win_size, mode="reflect", axes=axes)

    n_points = win_size ** len(axes)
    cov_norm = n_points / (n_points - 1) if use_sample_covariance else 1.0
    ux, uy = smooth(x), smooth(y)
    vx = smooth(x * x)
    vx -= ux * ux
    vy = smooth(y * y)
    vy -= uy * uy
    vxy = smooth(x * y)
    vxy -= ux * uy
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    num = (2 * ux * uy + c1) * (2 * cov_norm * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (cov_norm * (vx + vy) + c2)
    return num / den, (win_size - 1) // 2


def _window_radius(kwargs: Mapping) -> int:
    """How far the SSIM window reaches (the border skimage crops, and the filter's own support)."""
    sigma = float(kwargs.get("sigma", 1.5))
    gauss_radius = int(3.5 * sigma + 0.5)
    win = kwargs.get("win_size")
    if win is None:
        win = 2 * gauss_radius + 1 if kwargs.get("gaussian_weights") else 7
    radius = (int(win) - 1) // 2
    return max(radius, gauss_radius) if kwargs.get("gaussian_weights") else radius


def _mask_box(mask: np.ndarray, axes: Sequence[int], margin: int) -> tuple[slice, ...]:
    """The mask's bounding box, grown by ``margin`` along ``axes``: SSIM there only needs voxels inside it. The
    callers have checked that the mask is not empty (:func:`_check_pair`, or a labelled component)."""
    box = mask_box(mask, margin, axes)
    assert box is not None, "empty mask reached _mask_box"
    return box


def _interior_in_box(shape: tuple[int, ...], box: tuple[slice, ...], axes: Sequence[int], pad: int) -> np.ndarray:
    """Boolean array over ``box``: True where a voxel is ≥ ``pad`` from the full image's border along ``axes``."""
    inside = np.ones([b.stop - b.start for b in box], dtype=bool)
    for axis in axes:
        idx = np.arange(box[axis].start, box[axis].stop)
        ok = (idx >= pad) & (idx < shape[axis] - pad)
        inside &= ok.reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return inside


def _ssim_in_region(pred, target, mask, data_range, axes, reduce_axes, kwargs):
    """Sum of the SSIM map and voxel count over ``mask`` ∩ interior, reduced over ``reduce_axes`` (on a crop)."""
    box = _mask_box(mask, axes, _window_radius(kwargs))
    smap, pad = ssim_map(pred[box], target[box], data_range, axes=axes, **kwargs)
    region = mask[box] & _interior_in_box(pred.shape, box, axes, pad)
    total = np.where(region, smap, 0).sum(axis=reduce_axes, dtype=np.float64)
    return total, region.sum(axis=reduce_axes), box


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    data_range: float | None = None,
    *,
    slice_axis: int | None = None,
    **kwargs,
) -> float:
    """Mean SSIM; N-D window by default (3D for a volume), or 2D per slice across ``slice_axis``.

    With ``slice_axis`` the result is the mean over slices of each slice's (masked) SSIM, slices without mask
    voxels skipped. ``kwargs`` go to :func:`ssim_map` (``gaussian_weights``, ``win_size``...). With a mask the
    map is only computed on the mask's bounding box grown by the window radius: the same values, less work.
    """
    pred, target, mask = _check_pair(pred, target, mask)
    dr = resolve_data_range(target, mask, data_range)
    if slice_axis is not None:
        values = per_slice_metrics(pred, target, mask, dr, slice_axis, metrics=("ssim",), **kwargs)["ssim"]
        if np.isnan(values).all():
            raise ValueError("no slice has mask voxels inside the SSIM window's border band")
        return float(np.nanmean(values))
    axes = tuple(range(pred.ndim)) if kwargs.get("axes") is None else tuple(a % pred.ndim for a in kwargs["axes"])
    kwargs = {k: v for k, v in kwargs.items() if k != "axes"}
    if mask is None:
        mask = np.ones(pred.shape, dtype=bool)
    total, count, _ = _ssim_in_region(pred, target, mask, dr, axes, None, kwargs)
    if count == 0:
        raise ValueError("mask lies entirely within the SSIM window's border band")
    return float(total / count)


def _einsum_sum_squares(ndim: int, axis: int) -> str:
    letters = "abcdefgh"[:ndim]
    return f"{letters},{letters}->{letters[axis]}"


def per_slice_metrics(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None,
    data_range: float,
    slice_axis: int,
    *,
    metrics: Sequence[str] = ("psnr", "ssim", "nmse"),
    min_slice_voxels: int = 1,
    **ssim_kwargs,
) -> dict[str, np.ndarray]:
    """2D metrics of every slice across ``slice_axis`` in one vectorised pass; NaN for slices left out.

    A slice is evaluated when ``mask`` has at least ``min_slice_voxels`` voxels in it (and, for SSIM, inside the
    window's border band). ``data_range`` is the same for all slices (the volume's; see the module docstring).
    """
    pred, target, mask = _check_pair(pred, target, mask)
    axis = int(slice_axis) % pred.ndim
    other = tuple(i for i in range(pred.ndim) if i != axis)
    if mask is None:
        mask = np.ones(pred.shape, dtype=bool)
    counts = mask.sum(axis=other)
    keep = counts >= max(1, int(min_slice_voxels))
    out: dict[str, np.ndarray] = {}
    if "psnr" in metrics or "nmse" in metrics:
        box = _mask_box(mask, (), 0)
        m = mask[box]
        t_box = np.where(m, target[box], 0)
        d_box = np.where(m, pred[box], 0) - t_box
        sse = np.zeros(pred.shape[axis], dtype=np.float64)
        energy = np.zeros(pred.shape[axis], dtype=np.float64)
        sse[box[axis]] = np.einsum(_einsum_sum_squares(pred.ndim, axis), d_box, d_box, dtype=np.float64)
        energy[box[axis]] = np.einsum(_einsum_sum_squares(pred.ndim, axis), t_box, t_box, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if "psnr" in metrics:
                mse_k = sse / np.maximum(counts, 1)
                psnr_k = 10.0 * np.log10(data_range**2 / np.where(mse_k > 0, mse_k, 1))
                out["psnr"] = np.where(keep, np.where(mse_k > 0, psnr_k, np.inf), np.nan)
            if "nmse" in metrics:
                out["nmse"] = np.where(keep & (energy > 0), sse / np.where(energy > 0, energy, 1), np.nan)
    if "ssim" in metrics:
        values = np.full(pred.shape[axis], np.nan)
        if keep.any():
            total, n_inside, box = _ssim_in_region(pred, target, mask, data_range, other, other, ssim_kwargs)
            with np.errstate(divide="ignore", invalid="ignore"):
                values[box[axis]] = np.where(n_inside > 0, total / np.maximum(n_inside, 1), np.nan)
            values[~keep] = np.nan
        out["ssim"] = values
    return out


def brain_mask_like_official(
    target: np.ndarray, threshold: float = 0.1, *, max_hole_size: int | None = None
) -> np.ndarray:
    """Brain mask as in the official code (notes/facts.md §1): SD > ``threshold`` after min–max normalisation,
    holes filled, largest connected component kept (which also removes every small object).

    Works for 2D slices and 3D volumes (6-/4-connectivity). ``max_hole_size``: fill only enclosed holes up to
    that many voxels (None: all enclosed holes). Assumption: the official threshold is applied after the
    per-slice [0, 1] normalisation; here the min–max is over the array given (slice or volume).
    """
    t = np.asarray(target, dtype=np.float64)
    lo, hi = float(t.min()), float(t.max())
    if hi <= lo:
        return np.zeros(t.shape, dtype=bool)
    mask = (t - lo) / (hi - lo) > threshold
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    # Holes are enclosed, so they lie in the component's bounding box grown by one voxel: label only that.
    box = _mask_box(mask, tuple(range(mask.ndim)), 1)
    inner = mask[box]
    background, n_bg = ndimage.label(~inner)
    if n_bg:
        border = np.zeros(inner.shape, dtype=bool)
        for axis in range(inner.ndim):
            border[(slice(None),) * axis + (0,)] = True
            border[(slice(None),) * axis + (-1,)] = True
        holes = np.ones(n_bg + 1, dtype=bool)
        holes[0] = False
        holes[np.unique(background[border & (background > 0)])] = False
        if max_hole_size is not None:
            holes &= np.bincount(background.ravel(), minlength=n_bg + 1) <= max_hole_size
        mask[box] = inner | holes[background]
    return mask


def evaluate_volume(
    pred: np.ndarray,
    target: np.ndarray,
    brain_mask: np.ndarray | None = None,
    regions: Mapping[str, np.ndarray] | None = None,
    spacing: Sequence[float] | None = None,
    *,
    data_range: float | None = None,
    orientations: Sequence[str] = ORIENTATIONS,
    min_slice_voxels: int = 16,
    **ssim_kwargs,
) -> dict[str, float]:
    """All non-learned metrics of one subject, as a flat dict (one row of a results table).

    Keys: ``data_range``, ``psnr``/``ssim``/``nmse``/``bias`` (3D, inside the brain mask), ``psnr_2d``/
    ``ssim_2d``/``nmse_2d`` (mean over ``orientations`` of the mean over that orientation's slices with at least
    ``min_slice_voxels`` brain voxels) and the same per orientation (``ssim_2d_axial``...), ``bias_<region>``,
    ``mean_pred_<region>``, ``mean_target_<region>`` for each region, ``brain_voxels`` and, given ``spacing``
    (mm), ``brain_volume_ml``. ``brain_mask=None`` derives it with :func:`brain_mask_like_official`.
    """
    pred, target, brain_mask = _check_pair(pred, target, brain_mask)
    if brain_mask is None:
        brain_mask = brain_mask_like_official(target)
        if not brain_mask.any():
            raise ValueError("the target yields an empty brain mask")
    dr = resolve_data_range(target, brain_mask, data_range)
    row: dict[str, float] = {
        "data_range": dr,
        "psnr": psnr(pred, target, brain_mask, dr),
        "ssim": ssim(pred, target, brain_mask, dr, **ssim_kwargs),
        "nmse": nmse(pred, target, brain_mask),
        "bias": relative_bias(pred, target, brain_mask),
    }
    per_orientation: dict[str, dict[str, float]] = {}
    for name in orientations:
        values = per_slice_metrics(
            pred, target, brain_mask, dr, ORIENTATION_AXIS[name], min_slice_voxels=min_slice_voxels, **ssim_kwargs
        )
        per_orientation[name] = {
            k: float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan") for k, v in values.items()
        }
    for metric in ("psnr", "ssim", "nmse"):
        vals = [per_orientation[o][metric] for o in orientations]
        row[f"{metric}_2d"] = float(np.mean(vals)) if vals else float("nan")
        for o in orientations:
            row[f"{metric}_2d_{o}"] = per_orientation[o][metric]
    for name, region in (regions or {}).items():
        region = np.asarray(region).astype(bool, copy=False)
        if region.shape != target.shape:
            raise ValueError(f"region {name!r} has shape {region.shape}, expected {target.shape}")
        if not region.any():
            row[f"bias_{name}"] = row[f"mean_pred_{name}"] = row[f"mean_target_{name}"] = float("nan")
            continue
        row[f"bias_{name}"] = relative_bias(pred, target, region)
        row[f"mean_pred_{name}"] = float(np.mean(pred[region], dtype=np.float64))
        row[f"mean_target_{name}"] = float(np.mean(target[region], dtype=np.float64))
    row["brain_voxels"] = float(brain_mask.sum())
    if spacing is not None:
        row["brain_volume_ml"] = float(brain_mask.sum() * np.prod([float(s) for s in spacing]) / 1000.0)
    return row
