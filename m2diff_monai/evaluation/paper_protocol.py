"""The papers' evaluation protocol: the official M2Diff test loop (``m2diff.py``; notes/facts.md §1), on volumes.

The papers' Table I numbers come from that loop; the 3D and 2D metrics of :mod:`.metrics` use another protocol
(inside the preprocessing brain mask, one data range per subject), so their numbers are not comparable with the
tables. This module reproduces the official loop on each **axial** slice (the third axis of the evaluation grid,
which :mod:`.run` reorders to RAS+) and returns the columns ``psnr_paper``, ``ssim_paper``, ``nmse_paper``,
``lpips_paper`` and ``paper_slices``:

1. **Intensities** (the official loader, ``helping/dataloaders.py``): each SD slice is min–max scaled to [0, 1]
   on its own. Assumption, option ``scaling``: the official prediction was the network's output in that same
   normalised space, so every method's slice (LD included) is mapped with the **SD slice's** min and max
   (``"reference"``, default: one affine per slice shared by all rows, so a prediction equal to the SD in
   original units scores perfectly and global scale errors are not hidden). ``"own"`` min–max scales each
   image's slice on its own, as the official loader treated its inputs (this is how the papers' LD row was
   computed); it hides a prediction's scale error.
2. **Padding**: zero-padded to ``pad_to``² (256, the official loader), centred, the odd pixel at the end
   (``(pad_to − n) // 2`` before). A slice wider than ``pad_to`` is not padded along that axis (the official
   loader would fail). The published ``m2diff.py`` uses the 128 loader (``BiTaskPETDatasetMat_128``): pad 128
   there — PSNR moves by 10·log10(256²/128²) ≈ 6 dB with that choice alone.
3. **Brain mask per slice** (``helping/utils.calculate_brain_mask``): the padded SD slice min–max scaled,
   ``> threshold`` (0.1), objects and then holes smaller than ``min_size`` pixels removed
   (``skimage.morphology.remove_small_objects`` / ``remove_small_holes``, 4-connected: their defaults), the
   largest 8-connected component kept (``skimage.measure.label`` default). Slices whose mask is empty are
   skipped (as the official loop does). ``min_size``: 1000 pixels in the official code, on ~1 mm pixels; at
   other pixel sizes the default (``min_size=None``) scales it to the same area, 1000 mm² / pixel area (250 at
   2 mm, 62 at 4 mm): the literal 1000 keeps 19 of the 47 axial slices of a 4 mm demo SD PET, 62 keeps 40.
   Within ±10 % of 1 mm² the exact 1000 is kept.
4. **Metrics** on the whole padded slice, SD and prediction both multiplied by the mask, with **torchmetrics**:
   ``peak_signal_noise_ratio`` with ``data_range`` = the masked SD slice's max − min (the official
   ``PeakSignalNoiseRatio()`` called without a range: older torchmetrics took each call's target range,
   ``max(t.max(), 0) − min(t.min(), 0)`` from its zero-initialised state; current torchmetrics requires the
   argument, so it is passed as a number — a tuple would also clamp the prediction, which the official call
   did not), ``structural_similarity_index_measure`` with its defaults (11-tap Gaussian, σ 1.5, data range
   max(range p, range t) of that call), NMSE = Σ(p − t)²/Σt² (``helping/utils.nmse``), LPIPS AlexNet with the
   masked one-channel [0, 1] slices fed as the official call did (no [−1, 1] mapping; lpips' scaling layer
   broadcasts the channel to RGB). Because the zeroed background counts in the mean, PSNR is ≈ 10·log10(N/N_mask)
   dB higher than a mean over the mask (N = pad_to², N_mask = the brain pixels): ~5 dB on a 256² brain slice.
5. **Means**: over the scored slices of a subject (one row per subject and method), then over subjects in the
   tables. The official loop pooled all slices of all test subjects (each subject weighted by its slice count).

Metrics run one slice per call (SSIM's and PSNR's data ranges are per call, so a batch would change them);
LPIPS runs in batches (exact: the network scores each image on its own).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PAPER_PAD = 256
OFFICIAL_THRESHOLD = 0.1
OFFICIAL_MIN_SIZE = 1000  # pixels, on the official ~1 mm slices
OFFICIAL_PIXEL_AREA_MM2 = 1.0
SCALINGS = ("reference", "own")
AXIAL_AXIS = 2
_SSIM_RADIUS = 5  # torchmetrics' default Gaussian window: 11 taps (σ 1.5)
COLUMNS = ("psnr_paper", "ssim_paper", "nmse_paper", "lpips_paper")


@dataclass(frozen=True)
class PaperOptions:
    """Choices of the protocol (recorded in ``run.json``); defaults = the official code."""

    scaling: str = "reference"
    pad_to: int = PAPER_PAD
    min_size: int | None = None  # None: OFFICIAL_MIN_SIZE scaled to the pixel area
    threshold: float = OFFICIAL_THRESHOLD

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown paper-protocol scaling {self.scaling!r}; choose reference or own")
        if int(self.pad_to) < 0:
            raise ValueError("pad_to must be >= 0 (0: no padding)")
        if self.min_size is not None and int(self.min_size) < 1:
            raise ValueError("min_size must be >= 1 pixel")


def scaled_min_size(pixel_area_mm2: float) -> int:
    """The official 1000-pixel threshold as the same area on pixels of ``pixel_area_mm2``; exactly 1000 within
    ±10 % of the official 1 mm² pixels."""
    area = float(pixel_area_mm2)
    if not area > 0:
        raise ValueError(f"pixel area must be > 0, got {area}")
    if abs(area / OFFICIAL_PIXEL_AREA_MM2 - 1.0) <= 0.1:
        return OFFICIAL_MIN_SIZE
    return max(1, int(round(OFFICIAL_MIN_SIZE * OFFICIAL_PIXEL_AREA_MM2 / area)))


def pad_slice(image: np.ndarray, pad_to: int = PAPER_PAD) -> np.ndarray:
    """Zero-pad a 2D slice to ``pad_to``² as the official loader: centred, the odd pixel after; axes already
    ≥ ``pad_to`` (or ``pad_to`` = 0) are left as they are."""
    image = np.asarray(image)
    widths = []
    for n in image.shape:
        total = max(int(pad_to) - n, 0)
        widths.append((total // 2, total - total // 2))
    return np.pad(image, widths, mode="constant", constant_values=0) if any(sum(w) for w in widths) else image


def _remove_small(mask: np.ndarray, min_size: int, holes: bool) -> np.ndarray:
    """skimage's small-object / small-hole removal, "smaller than ``min_size``" as the official call
    (``min_size=`` / ``area_threshold=``, exclusive) on any scikit-image (0.26 renamed it ``max_size``,
    inclusive)."""
    from skimage import morphology

    func = morphology.remove_small_holes if holes else morphology.remove_small_objects
    try:
        return func(mask, max_size=int(min_size) - 1)
    except TypeError:  # scikit-image < 0.26
        return func(mask, int(min_size))


def official_brain_mask(
    image: np.ndarray, threshold: float = OFFICIAL_THRESHOLD, min_size: int = OFFICIAL_MIN_SIZE
) -> np.ndarray:
    """The official per-slice brain mask of a 2D slice: min–max scaled > ``threshold``, objects then holes
    smaller than ``min_size`` pixels removed (4-connected), the largest 8-connected component (empty if none)."""
    from skimage.measure import label

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a 2D slice, got shape {image.shape}")
    lo, hi = float(image.min()), float(image.max())
    if not hi > lo:  # constant slice: the official normalisation divides by zero (NaN → empty mask)
        return np.zeros(image.shape, dtype=bool)
    mask = (image - lo) / (hi - lo) > threshold
    mask = _remove_small(mask, min_size, holes=False)
    mask = _remove_small(mask, min_size, holes=True)
    labels = label(mask, connectivity=2)
    if labels.max() == 0:
        return np.zeros(image.shape, dtype=bool)
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _minmax(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


@dataclass
class PaperReference:
    """The SD side of the protocol for one subject, computed once and shared by every method row."""

    slices: np.ndarray  # axial indices with a non-empty mask
    masks: np.ndarray  # (K, H, W) bool, padded
    targets: np.ndarray  # (K, H, W) float32: padded, scaled, masked SD slices
    sd_min: np.ndarray  # (K,) the SD slices' min and max (original units) for "reference" scaling
    sd_max: np.ndarray
    options: PaperOptions
    min_size: int

    @property
    def empty(self) -> bool:
        return len(self.slices) == 0


def prepare_reference(
    reference: np.ndarray, spacing: Sequence[float] | None, options: PaperOptions | None = None
) -> PaperReference:
    """Scaled, padded, masked SD slices and their masks (axial = axis 2 of a RAS+ volume)."""
    options = options or PaperOptions()
    reference = np.asarray(reference)
    if reference.ndim != 3:
        raise ValueError(f"expected a 3D reference volume, got shape {reference.shape}")
    if options.min_size is not None:
        min_size = int(options.min_size)
    else:
        area = 1.0 if spacing is None else float(spacing[0]) * float(spacing[1])
        min_size = scaled_min_size(area)
    kept, masks, targets, lows, highs = [], [], [], [], []
    for k in range(reference.shape[AXIAL_AXIS]):
        sd = np.asarray(reference[:, :, k], dtype=np.float64)
        lo, hi = float(sd.min()), float(sd.max())
        if not hi > lo:
            continue
        padded = pad_slice(_minmax(sd, lo, hi), options.pad_to)
        mask = official_brain_mask(padded, options.threshold, min_size)
        if not mask.any():
            continue
        kept.append(k)
        masks.append(mask)
        targets.append((padded * mask).astype(np.float32))
        lows.append(lo)
        highs.append(hi)
    shape = (0, *pad_slice(np.zeros(reference.shape[:2]), options.pad_to).shape)
    return PaperReference(
        slices=np.asarray(kept, dtype=int),
        masks=np.stack(masks) if masks else np.zeros(shape, dtype=bool),
        targets=np.stack(targets) if targets else np.zeros(shape, dtype=np.float32),
        sd_min=np.asarray(lows),
        sd_max=np.asarray(highs),
        options=options,
        min_size=min_size,
    )


def method_slices(volume: np.ndarray, ref: PaperReference) -> np.ndarray:
    """A method's (or LD's) slices as the protocol scores them: scaled (``options.scaling``), padded, masked."""
    volume = np.asarray(volume)
    out = np.zeros(ref.targets.shape, dtype=np.float32)
    for i, k in enumerate(ref.slices):
        image = np.asarray(volume[:, :, k], dtype=np.float64)
        if ref.options.scaling == "reference":
            scaled = _minmax(image, float(ref.sd_min[i]), float(ref.sd_max[i]))
        else:
            scaled = _minmax(image, float(image.min()), float(image.max()))
        out[i] = pad_slice(scaled, ref.options.pad_to) * ref.masks[i]
    return out


def psnr_data_range(target: np.ndarray) -> float:
    """What ``PeakSignalNoiseRatio()`` without a range used per call: the target's max − min, from a state
    that starts at 0 (= max − min for a masked slice, whose background is 0)."""
    return float(max(float(target.max()), 0.0) - min(float(target.min()), 0.0))


@functools.lru_cache(maxsize=1)
def _ssim_mean_is_whole_map() -> bool:
    """Whether the installed torchmetrics averages SSIM over the whole map (≥ 1.5, PR #2721) rather than the
    map less a 5-pixel border (older); decides whether the cropped computation below applies."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    generator = torch.Generator().manual_seed(0)
    p, t = torch.rand(2, 1, 1, 24, 24, generator=generator)
    value, full = structural_similarity_index_measure(p, t, data_range=1.0, return_full_image=True)
    return bool(torch.isclose(value, full.mean(), rtol=1e-5, atol=1e-7))


def ssim_padded(pred, target) -> float:
    """``structural_similarity_index_measure(pred, target)`` with its defaults on one (1, 1, H, W) slice pair.

    Speed-up, same number: on a zero-padded, masked slice the SSIM map is exactly 1 wherever the 11×11 window
    sees only zeros, so torchmetrics computes the map on the content's bounding box grown by 2 window radii
    (with the whole slice's data range, its default) and the rest of the slice adds 1 per pixel. Used only
    where the installed torchmetrics averages the whole map; otherwise the whole slice is passed."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure

    height, width = int(target.shape[-2]), int(target.shape[-1])
    content = ((pred != 0) | (target != 0))[0, 0]
    rows, cols = torch.nonzero(content.any(1)).flatten(), torch.nonzero(content.any(0)).flatten()
    margin = 2 * _SSIM_RADIUS
    if rows.numel() and _ssim_mean_is_whole_map():
        r0, r1 = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, height)
        c0, c1 = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, width)
        area = (r1 - r0) * (c1 - c0)
        if area < 0.8 * height * width and min(r1 - r0, c1 - c0) > margin:
            data_range = float(max(pred.max() - pred.min(), target.max() - target.min()))
            _, full = structural_similarity_index_measure(
                pred[..., r0:r1, c0:c1], target[..., r0:r1, c0:c1], data_range=data_range, return_full_image=True
            )
            return float((full.double().sum() + (height * width - area)) / (height * width))
    return float(structural_similarity_index_measure(pred, target))


def slice_scores(preds: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """PSNR, SSIM (torchmetrics, one call per slice: their data ranges are per call) and NMSE of (K, H, W)
    masked slices."""
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio

    n = len(targets)
    out = {name: np.full(n, np.nan) for name in ("psnr", "ssim")}
    p_all = torch.from_numpy(np.ascontiguousarray(preds, dtype=np.float32))
    t_all = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
    with torch.inference_mode():
        for i in range(n):
            p, t = p_all[i][None, None], t_all[i][None, None]
            out["psnr"][i] = float(peak_signal_noise_ratio(p, t, data_range=psnr_data_range(targets[i])))
            out["ssim"][i] = ssim_padded(p, t)
    diff = preds - targets
    energy = np.einsum("kij,kij->k", targets, targets, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["nmse"] = np.einsum("kij,kij->k", diff, diff, dtype=np.float64) / energy
    return out


def lpips_slices(
    model, preds: np.ndarray, targets: np.ndarray, batch_size: int = 16, device: str = "cpu"
) -> np.ndarray:
    """LPIPS of masked [0, 1] slices fed as the official call did: ``model(pred, target)`` on one-channel images
    (repeated to RGB, which equals lpips' broadcasting), no [−1, 1] mapping. ``model``: an ``lpips.LPIPS`` or
    its rebuild :class:`~m2diff_monai.evaluation.lpips_net.AlexLPIPS`."""
    import torch

    values = np.full(len(targets), np.nan)
    with torch.inference_mode():
        for start in range(0, len(targets), int(batch_size)):
            stop = start + int(batch_size)
            p = torch.as_tensor(preds[start:stop], dtype=torch.float32, device=device)[:, None].expand(-1, 3, -1, -1)
            t = torch.as_tensor(targets[start:stop], dtype=torch.float32, device=device)[:, None].expand(-1, 3, -1, -1)
            values[start:stop] = model(p, t).reshape(-1).double().cpu().numpy()
    return values


def _mean(values: np.ndarray) -> float:
    """Mean over slices; +inf when any slice is perfect (PSNR), NaN when nothing was scored."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(np.mean(values)) if values.size else float("nan")


def score_volume(
    volume: np.ndarray, ref: PaperReference, lpips_model=None, lpips_device: str = "cpu"
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(row, per-slice values) of one method against a prepared reference. Row keys: :data:`COLUMNS` and
    ``paper_slices`` (slices scored), ``paper_min_size`` (the mask threshold used); ``lpips_paper`` is NaN
    without ``lpips_model``."""
    if ref.empty:
        return {**{c: float("nan") for c in COLUMNS}, "paper_slices": 0, "paper_min_size": int(ref.min_size)}, {}
    preds = method_slices(volume, ref)
    values = slice_scores(preds, ref.targets)
    if lpips_model is not None:
        values["lpips"] = lpips_slices(lpips_model, preds, ref.targets, device=lpips_device)
    row = {
        f"{name}_paper": _mean(values[name]) if name in values else float("nan")
        for name in ("psnr", "ssim", "nmse", "lpips")
    }
    row["paper_slices"] = int(len(ref.slices))
    row["paper_min_size"] = int(ref.min_size)
    return row, values


def lpips_volume(volume: np.ndarray, ref: PaperReference, lpips_model, device: str = "cpu") -> float:
    """Mean LPIPS over the protocol's slices (NaN when no slice is scored)."""
    if ref.empty:
        return float("nan")
    return _mean(lpips_slices(lpips_model, method_slices(volume, ref), ref.targets, device=device))


def describe(ref: PaperReference | None = None, options: PaperOptions | None = None) -> str:
    """One line for reports: how the ``*_paper`` columns were computed."""
    options = ref.options if ref is not None else (options or PaperOptions())
    size = (
        f"{ref.min_size}"
        if ref is not None
        else ("scaled to the pixel area" if options.min_size is None else str(options.min_size))
    )
    pad = f"zero-padded to {options.pad_to}²" if options.pad_to else "not padded"
    scale = (
        "each image scaled by the SD slice's min–max"
        if options.scaling == "reference"
        else "each image min–max scaled on its own"
    )
    return (
        f"axial slices, {scale}, {pad}, official SD brain mask per slice (> {options.threshold}, objects/holes "
        f"< {size} px removed, largest component), metrics over the whole padded slice (torchmetrics PSNR/SSIM)"
    )


def run_record(options: PaperOptions, columns: Sequence[str]) -> dict:
    """What ``run.json`` records of the papers' protocol: its columns, the one-line description, torchmetrics'
    version (its SSIM/PSNR compute the columns) and the options."""
    import torchmetrics

    return {
        "columns": list(columns),
        "description": describe(options=options),
        "torchmetrics": torchmetrics.__version__,
        **options.__dict__,
    }


__all__ = [
    "COLUMNS",
    "PaperOptions",
    "PaperReference",
    "describe",
    "lpips_slices",
    "lpips_volume",
    "method_slices",
    "official_brain_mask",
    "pad_slice",
    "prepare_reference",
    "psnr_data_range",
    "run_record",
    "scaled_min_size",
    "score_volume",
    "slice_scores",
    "ssim_padded",
]
