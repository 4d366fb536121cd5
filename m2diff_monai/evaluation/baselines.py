"""Classical baselines a PET user would otherwise pick, scored by ``m2diff-evaluate`` as method rows beside LD.

Each baseline filters the LD PET the LD row uses (original units; the native grid by default) and nothing else:
no reference, no MRI. Their free settings are chosen on the manifest's **validation** split (subjects with an
SD reference) by maximising the mean 3D PSNR inside the brain mask — the report's own metric
(:func:`.metrics.psnr`, data range = the SD's peak in the brain) on the same grid — and never on the evaluated
test subjects. Without a validation subject the documented defaults below are used and the report says so.

- ``gaussian`` → row ``Gaussian``: the usual post-reconstruction filter, ``scipy.ndimage.gaussian_filter`` with
  σ = FWHM / (2·√(2·ln 2)) / spacing per axis (mm → voxels), whole volume, ``mode="nearest"``. FWHM chosen from
  ``fwhm_grid_mm`` (default 1–8 mm in 0.5 mm steps, 9, 10, 12 mm). Default without validation: 4 mm.
- ``nlm`` → row ``NLM``: ``skimage.restoration.denoise_nl_means`` in 3D (fast mode, 3³ patches, search distance
  3). σ is estimated on each subject's own LD (:func:`estimate_noise_sigma`: robust spread of the LD minus its
  1-voxel Gaussian smoothing, inside the brain); h = ``h_factor`` · σ with ``h_factor`` chosen on validation from
  ``nlm_h_factors``.
  Default without validation: 0.8 (skimage's recommendation when σ is given).
- ``bm3d`` → row ``BM4D``: the volumetric member of the BM3D family (the ``bm4d`` package, installed with
  ``bm3d``), σ = ``bm4d_sigma_factor`` · the same estimated σ. BM4D is slow (measured in benchmarks/
  bench_evaluate.py and docs/evaluation.md), so a lighter profile is used (reference-block step 4, search window
  5, Wiener stack 16: the same error as the default profile on a test volume at ~40 % of its time) and the
  factor grid defaults to ``(1.0,)``: σ estimated, not tuned. Pass more factors to tune it on validation.

NLM and BM4D run on the brain's bounding box plus a margin (``margin_voxels``; their support is a few voxels)
to bound the work: voxels outside that box keep the LD value. Every metric is computed inside the brain mask,
which lies inside the box, so the scores equal those of filtering the whole volume up to the box edge effects,
which the margin keeps out of the brain. Each filter works on the LD divided by its 99th percentile in the box
and is scaled back, so the settings do not depend on the units.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from m2diff_monai.data.grid import mask_box
from m2diff_monai.errors import InputError

#: ``--baselines`` name → method row name.
BASELINE_ROWS: dict[str, str] = {"gaussian": "Gaussian", "nlm": "NLM", "bm3d": "BM4D"}
ALIASES = {"bm4d": "bm3d", "gauss": "gaussian", "nl_means": "nlm"}
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
DEFAULT_FWHM_GRID_MM = (*[1.0 + 0.5 * i for i in range(15)], 9.0, 10.0, 12.0)


@dataclass(frozen=True)
class BaselineSettings:
    """The baselines' settings: the grids searched on validation and the values used (``chosen``)."""

    fwhm_grid_mm: tuple[float, ...] = DEFAULT_FWHM_GRID_MM
    default_fwhm_mm: float = 4.0
    nlm_h_factors: tuple[float, ...] = (0.25, 0.4, 0.6, 0.9, 1.3)
    default_nlm_h_factor: float = 0.8
    nlm_patch_size: int = 3
    nlm_patch_distance: int = 3
    bm4d_sigma_factors: tuple[float, ...] = (1.0,)
    default_bm4d_sigma_factor: float = 1.0
    bm4d_fast_profile: bool = True
    bm4d_threads: int = 1
    margin_voxels: int = 6

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class TuningCase:
    """One validation subject: its LD, SD reference and brain mask on the evaluation grid."""

    subject: str
    ld: np.ndarray
    reference: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]


@dataclass
class ChosenSettings:
    """What the rows of a run use, and how it was chosen (recorded in run.json and the report)."""

    names: tuple[str, ...]
    fwhm_mm: float | None = None
    nlm_h_factor: float | None = None
    bm4d_sigma_factor: float | None = None
    tuned_on: str | None = None  # "val" or None (defaults)
    tuning_subjects: list[str] = field(default_factory=list)
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: BaselineSettings = field(default_factory=BaselineSettings)
    seconds: dict[str, Any] = field(default_factory=dict)  # tuning_<name> and <subject> → {row: s}
    noise_sigma: dict[str, float] = field(default_factory=dict)  # subject → estimated σ (original units)

    @property
    def rows(self) -> list[str]:
        return [BASELINE_ROWS[n] for n in self.names]

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "settings"}
        out["names"] = list(self.names)
        out["rows"] = self.rows
        out["grids"] = self.settings.as_dict()
        return out


def best_baseline(psnr_by_method: Mapping[str, float], rows: Sequence[str] | None = None) -> str | None:
    """The baseline row (``rows``, default every :data:`BASELINE_ROWS` name) with the highest finite PSNR in
    ``psnr_by_method``; None when the table has none. The bar the report's margins and targets measure against."""
    names = set(BASELINE_ROWS.values() if rows is None else rows)
    scored = {m: float(p) for m, p in psnr_by_method.items() if m in names and math.isfinite(float(p))}
    return max(scored, key=scored.__getitem__) if scored else None


def parse_baselines(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"gaussian,nlm,bm3d"`` (or a list) → canonical names in the given order; ``None``/``""`` → ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in BASELINE_ROWS:
            raise InputError(f"unknown baseline {raw.strip()!r}; choose from {', '.join(BASELINE_ROWS)}")
        if name not in names:
            names.append(name)
    return tuple(names)


# ------------------------------------------------------------------------------------------- the filters
def gaussian_sigma_voxels(fwhm_mm: float, spacing: Sequence[float]) -> tuple[float, ...]:
    """σ per axis in voxels of a Gaussian of ``fwhm_mm`` on a grid of ``spacing`` mm."""
    return tuple(float(fwhm_mm) / FWHM_PER_SIGMA / float(s) for s in spacing)


def gaussian_baseline(ld: np.ndarray, fwhm_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """The LD smoothed by an isotropic Gaussian of ``fwhm_mm`` (mm), float32."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(
        np.asarray(ld, dtype=np.float32), gaussian_sigma_voxels(fwhm_mm, spacing), mode="nearest"
    ).astype(np.float32, copy=False)


def brain_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The region a baseline filters: the brain's bounding box grown by ``margin``; the whole volume without brain."""
    box = mask_box(np.asarray(mask), margin)
    return tuple(slice(0, n) for n in np.shape(mask)) if box is None else box


def _unit_scale(crop: np.ndarray) -> float:
    scale = float(np.percentile(crop, 99.0))
    return scale if scale > 0 else (float(np.abs(crop).max()) or 1.0)


def estimate_noise_sigma(ld: np.ndarray, mask: np.ndarray) -> float:
    """σ of the LD's noise (original units), from the LD alone: the robust spread (1.4826 · MAD) inside the brain
    mask of the residual LD − G₁(LD) (G₁: Gaussian of σ = 1 voxel), divided by that residual's gain on white
    noise, ‖δ − G₁δ‖₂ (exact for white noise).

    Why not ``skimage.restoration.estimate_sigma`` (wavelet MAD of the finest detail band): reconstructed PET
    noise is spatially correlated, so the finest band holds little of it — on the demo's LD it returned
    ≈ 4 Bq/mL where the LD − SD difference has a std of ≈ 1150 Bq/mL; this estimator gave ≈ 1130."""
    from scipy.ndimage import gaussian_filter

    data = np.asarray(ld, dtype=np.float32)
    inside = np.asarray(mask, dtype=bool)
    if not inside.any():
        return 0.0
    residual = (data - gaussian_filter(data, 1.0, mode="nearest"))[inside].astype(np.float64)
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return 1.4826 * mad / _white_noise_gain()


def _white_noise_gain() -> float:
    """‖δ − G₁δ‖₂ in 3D: the std of the residual of unit white noise."""
    from scipy.ndimage import gaussian_filter

    delta = np.zeros((17, 17, 17))
    delta[8, 8, 8] = 1.0
    return float(np.sqrt(np.sum((delta - gaussian_filter(delta, 1.0, mode="constant")) ** 2)))


def _in_box(
    ld: np.ndarray, mask: np.ndarray, margin: int, denoise: Callable[[np.ndarray, float], np.ndarray]
) -> np.ndarray:
    """``denoise(crop / scale, scale) * scale`` on the brain box of ``ld`` (``scale``: the crop's 99th
    percentile, so settings do not depend on the units); outside the box: the LD."""
    out = np.array(ld, dtype=np.float32, copy=True)
    box = brain_box(mask, margin)
    crop = out[box]
    scale = _unit_scale(crop)
    out[box] = np.asarray(denoise(crop / np.float32(scale), scale), dtype=np.float32) * np.float32(scale)
    return out


def nlm_baseline(
    ld: np.ndarray, mask: np.ndarray, h_factor: float, sigma: float, settings: BaselineSettings = BaselineSettings()
) -> np.ndarray:
    """3D non-local means of the LD's brain box, h = ``h_factor`` · ``sigma`` (σ in original units)."""
    from skimage.restoration import denoise_nl_means

    if not sigma * h_factor > 0:  # a noiseless LD (σ estimate 0): nothing to remove
        return np.array(ld, dtype=np.float32, copy=True)

    def denoise(unit: np.ndarray, scale: float) -> np.ndarray:
        s = sigma / scale
        return denoise_nl_means(
            unit,
            h=h_factor * s,
            sigma=s,
            patch_size=settings.nlm_patch_size,
            patch_distance=settings.nlm_patch_distance,
            fast_mode=True,
            preserve_range=True,
        )

    return _in_box(ld, mask, settings.margin_voxels, denoise)


def bm4d_profile(settings: BaselineSettings = BaselineSettings()):
    """The BM4D profile used: the package's ``np`` profile, lighter when ``bm4d_fast_profile``."""
    import bm4d

    profile = bm4d.BM4DProfile()
    profile.num_threads = int(settings.bm4d_threads)
    if settings.bm4d_fast_profile:
        profile.step_ht = profile.step_wiener = (4, 4, 4)
        profile.search_window_ht = profile.search_window_wiener = (5, 5, 5)
        profile.max_stack_size_wiener = 16
    return profile


def bm4d_baseline(
    ld: np.ndarray, mask: np.ndarray, sigma_factor: float, sigma: float, settings: BaselineSettings = BaselineSettings()
) -> np.ndarray:
    """BM4D (``bm4d.bm4d``, all stages) of the LD's brain box with noise σ = ``sigma_factor`` · ``sigma``."""
    import bm4d

    if not sigma * sigma_factor > 0:
        return np.array(ld, dtype=np.float32, copy=True)
    profile = bm4d_profile(settings)
    return _in_box(
        ld,
        mask,
        settings.margin_voxels,
        lambda unit, scale: bm4d.bm4d(unit, sigma_factor * sigma / scale, profile=profile),
    )


# ------------------------------------------------------------------------------------------- tuning
def _mean_psnr(cases: Sequence[TuningCase], make: Callable[[TuningCase], np.ndarray]) -> float:
    from m2diff_monai.evaluation.metrics import psnr, resolve_data_range

    values = [psnr(make(c), c.reference, c.mask, resolve_data_range(c.reference, c.mask)) for c in cases]
    return float(np.mean(values))


def _search(
    grid: Sequence[float], cases: Sequence[TuningCase], make: Callable[[TuningCase, float], np.ndarray]
) -> tuple[float, list[float]]:
    """The grid value with the highest mean PSNR over ``cases`` (the first on ties: the least smoothing)."""
    scores = [_mean_psnr(cases, lambda c, v=v: make(c, v)) for v in grid]
    return float(grid[int(np.argmax(scores))]), [round(s, 4) for s in scores]


def _noise_filter(
    name: str, ld: np.ndarray, mask: np.ndarray, factor: float, sigma: float, settings: BaselineSettings
) -> np.ndarray:
    """The NLM or BM4D row of ``ld`` with its noise-σ factor (both scale the LD's estimated σ)."""
    make = nlm_baseline if name == "nlm" else bm4d_baseline
    return make(ld, mask, factor, sigma, settings)


def _tune_noise_factor(
    name: str,
    label: str,
    grid: Sequence[float],
    default: float,
    cases: Sequence[TuningCase],
    sigmas: Mapping[str, float],
    settings: BaselineSettings,
    chosen: ChosenSettings,
) -> float:
    """The σ factor of NLM (``h``) or BM4D: searched on ``cases`` when the grid has several values (its curve is
    recorded in ``chosen``), the grid's only value when it has one (these filters are slow: nothing to score),
    the documented default without a validation case or grid."""
    if cases and len(grid) > 1:
        value, scores = _search(
            grid, cases, lambda c, v: _noise_filter(name, c.ld, c.mask, v, sigmas[c.subject], settings)
        )
        chosen.curves[name] = {label: list(grid), "mean_psnr": scores}
        return value
    return grid[0] if cases and grid else default


def choose_settings(
    names: Sequence[str],
    cases: Sequence[TuningCase],
    settings: BaselineSettings = BaselineSettings(),
    split: str = "val",
) -> ChosenSettings:
    """Pick each baseline's free setting on ``cases`` (validation subjects); defaults when there are none."""
    chosen = ChosenSettings(names=tuple(names), settings=settings)
    if not names:
        return chosen
    if cases:
        chosen.tuned_on = split
        chosen.tuning_subjects = [c.subject for c in cases]
    else:
        chosen.notes.append(
            "no validation subject with an SD reference in the manifest: documented defaults "
            "used, nothing tuned (never on the test split)"
        )
    sigmas = {c.subject: estimate_noise_sigma(c.ld, c.mask) for c in cases}
    if any(n in ("nlm", "bm3d") for n in names):
        chosen.noise_sigma.update({k: round(v, 6) for k, v in sigmas.items()})
    for name in names:
        t0 = time.perf_counter()
        if name == "gaussian":
            if cases:
                chosen.fwhm_mm, scores = _search(
                    settings.fwhm_grid_mm, cases, lambda c, v: gaussian_baseline(c.ld, v, c.spacing)
                )
                chosen.curves["gaussian"] = {"fwhm_mm": list(settings.fwhm_grid_mm), "mean_psnr": scores}
            else:
                chosen.fwhm_mm = settings.default_fwhm_mm
        elif name == "nlm":
            chosen.nlm_h_factor = _tune_noise_factor(
                name, "h_factor", settings.nlm_h_factors, settings.default_nlm_h_factor, cases, sigmas, settings, chosen
            )
        elif name == "bm3d":
            chosen.bm4d_sigma_factor = _tune_noise_factor(
                name,
                "sigma_factor",
                settings.bm4d_sigma_factors,
                settings.default_bm4d_sigma_factor,
                cases,
                sigmas,
                settings,
                chosen,
            )
        chosen.seconds[f"tuning_{name}"] = round(time.perf_counter() - t0, 3)
    return chosen


def tune_on_validation(
    volumes: Sequence[Any],
    names: Sequence[str],
    load: Callable[[dict], Any],
    has_reference: Callable[[dict], bool],
    evaluated: Sequence[str] = (),
    settings: BaselineSettings = BaselineSettings(),
) -> ChosenSettings:
    """Choose the settings on the manifest's ``val`` volumes that have an SD reference (only those are loaded:
    ``load(item)`` → an object with ``subject``, ``volumes["LD"]``, ``reference``, ``mask``, ``spacing``).
    ``evaluated``: the scored subjects; an overlap (evaluating the val split itself) is noted."""
    if not names:
        return ChosenSettings(names=(), settings=settings)
    cases = []
    for item in volumes:
        if isinstance(item, dict) and item.get("split") == "val" and has_reference(item):
            data = load(item)
            cases.append(
                TuningCase(str(data.subject), data.volumes["LD"], data.reference, data.mask, tuple(data.spacing))
            )
    chosen = choose_settings(names, cases, settings)
    overlap = sorted(set(chosen.tuning_subjects) & {str(s) for s in evaluated})
    if overlap:
        chosen.notes.append(
            f"the evaluated subjects include the tuning subjects ({', '.join(overlap)}): the "
            "baselines' scores on them are optimistic"
        )
    return chosen


def apply_baselines(
    ld: np.ndarray, mask: np.ndarray, spacing: Sequence[float], chosen: ChosenSettings, subject: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``{row name: filtered LD}`` in ``chosen.names`` order, and the seconds each took (the noise σ estimated
    for NLM/BM4D is recorded in ``chosen.noise_sigma[subject]``)."""
    out: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    sigma = None
    if any(n in ("nlm", "bm3d") for n in chosen.names):
        sigma = estimate_noise_sigma(ld, mask)
        if subject is not None:
            chosen.noise_sigma[str(subject)] = round(sigma, 6)
    for name in chosen.names:
        t0 = time.perf_counter()
        if name == "gaussian":
            out[BASELINE_ROWS[name]] = gaussian_baseline(ld, float(chosen.fwhm_mm), spacing)
        else:
            factor = chosen.nlm_h_factor if name == "nlm" else chosen.bm4d_sigma_factor
            out[BASELINE_ROWS[name]] = _noise_filter(name, ld, mask, float(factor), float(sigma), chosen.settings)
        seconds[BASELINE_ROWS[name]] = round(time.perf_counter() - t0, 3)
    return out, seconds


def with_baselines(
    volumes: Mapping[str, np.ndarray], baselines: Mapping[str, np.ndarray], ld_key: str = "LD"
) -> dict[str, np.ndarray]:
    """The volumes in report order: LD, the baselines, then the predictions."""
    ordered = {ld_key: volumes[ld_key], **baselines}
    ordered.update({k: v for k, v in volumes.items() if k != ld_key})
    return ordered


def settings_markdown(chosen: ChosenSettings) -> list[str]:
    """Report lines: what each baseline row is and how its setting was chosen."""
    if not chosen.names:
        return []
    where = (
        f"tuned on the `{chosen.tuned_on}` split ({len(chosen.tuning_subjects)} subject(s): "
        f"{', '.join(chosen.tuning_subjects)}) by the mean 3D PSNR inside the brain mask"
        if chosen.tuned_on
        else "documented defaults (not tuned)"
    )
    lines = [f"- Baselines (classical filters of the LD PET, computed here; settings {where}):"]
    for name in chosen.names:
        curve = chosen.curves.get(name)
        grid = ""
        if curve:
            key = next(k for k in curve if k != "mean_psnr")
            grid = (
                "; grid "
                + ", ".join(f"{v:g}" for v in curve[key])
                + " → mean PSNR "
                + ", ".join(f"{s:.2f}" for s in curve["mean_psnr"])
                + " dB"
            )
        if name == "gaussian":
            lines.append(f"  - Gaussian: FWHM {chosen.fwhm_mm:g} mm (scipy.ndimage.gaussian_filter){grid}.")
        elif name == "nlm":
            s = chosen.settings
            lines.append(
                f"  - NLM: skimage denoise_nl_means 3D, patch {s.nlm_patch_size}³, distance "
                f"{s.nlm_patch_distance}, σ = the noise estimate of each subject's LD, h = "
                f"{chosen.nlm_h_factor:g}·σ{grid}."
            )
        elif name == "bm3d":
            fast = " (lighter profile: step 4, search 5)" if chosen.settings.bm4d_fast_profile else ""
            lines.append(
                f"  - BM4D (the `bm3d` option runs volumetric BM4D, package bm4d){fast}: σ = "
                f"{chosen.bm4d_sigma_factor:g}·the noise estimate of each subject's LD"
                f"{grid or ' (estimated, not tuned)'}."
            )
    if chosen.noise_sigma:
        lines.append(
            "  - Noise σ estimated from each LD (original units): "
            + ", ".join(f"{sid} {sigma:.4g}" for sid, sigma in chosen.noise_sigma.items())
            + "."
        )
    lines += [f"  - Note: {n}." for n in chosen.notes]
    return lines


def as_settings(value: BaselineSettings | Mapping[str, Any] | None) -> BaselineSettings:
    """``None`` → the defaults; a dict of :class:`BaselineSettings` fields (lists for the grids) → settings."""
    if value is None or isinstance(value, BaselineSettings):
        return value or BaselineSettings()
    unknown = sorted(set(value) - set(BaselineSettings.__dataclass_fields__))
    if unknown:
        raise InputError(
            f"unknown baseline setting(s) {', '.join(unknown)}; known: "
            f"{', '.join(BaselineSettings.__dataclass_fields__)}"
        )
    return replace(BaselineSettings(), **{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in value.items()})


__all__ = [
    "BASELINE_ROWS",
    "best_baseline",
    "BaselineSettings",
    "ChosenSettings",
    "TuningCase",
    "apply_baselines",
    "as_settings",
    "bm4d_baseline",
    "choose_settings",
    "estimate_noise_sigma",
    "gaussian_baseline",
    "gaussian_sigma_voxels",
    "nlm_baseline",
    "parse_baselines",
    "settings_markdown",
    "tune_on_validation",
    "with_baselines",
]
