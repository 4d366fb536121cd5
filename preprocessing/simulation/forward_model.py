"""The PET acquisition model: activity volume → expected sinograms → Poisson counts → OSEM images, per axial plane.

Forward model of one axial plane (2D parallel beam; every plane of a volume at once):

    ȳ = η · exp(-A μ) ⊙ B(A x) + η · (s + r)

- ``x`` activity (input units), ``A`` Joseph line integrals in mm (:mod:`.projector`), ``B`` the scanner resolution:
  a Gaussian PSF of ``psf_fwhm_mm`` in plane and across planes, applied to the sinogram (equivalent for a Gaussian).
- ``μ`` the attenuation map (1/mm). Assumption: water (0.0096/mm at 511 keV) inside the head support — no skull —
  unless a μ-map is given.
- ``s`` scatter: the attenuated trues sinogram blurred by a broad Gaussian (``scatter_fwhm_mm``), scaled per plane so
  that scatter / (trues + scatter) = ``scatter_fraction``. ``r`` randoms: uniform per plane, ``randoms_fraction`` of
  the prompts. Assumption: both are known exactly in reconstruction (a perfect scatter and randoms estimate).
- ``η`` the count scale: chosen so the standard-dose scan has ``counts`` true (unscattered) coincidences over all
  planes. Assumption: default 3·10⁸ true counts (a long FDG brain acquisition on a PET/MR, like the 60-min DaCRA
  list-mode scans the M2Diff paper subsamples; about 3–4·10⁶ per 2 mm brain plane).

Noise: standard dose ``y_SD ~ Poisson(ȳ)``. Low dose at dose reduction factor ``DRF``, two explicit modes:
``nested`` — binomial thinning ``y_LD ~ Binomial(y_SD, 1/DRF)`` (exactly a Poisson(ȳ/DRF) process, the low-dose
events a subset of the standard-dose ones, like list-mode subsampling); ``independent`` —
``y_LD ~ Poisson(ȳ/DRF)`` drawn on its own (what ``simulate`` does from a given standard-dose image).

Reconstruction: OSEM (``iterations`` × ``subsets``, PSF, attenuation and background modelled, sensitivity images),
identical for SD and LD, then a Gaussian post-filter (``postfilter_fwhm_mm``). The LD image is reconstructed with
the system scaled by 1/DRF, so it is in the same units as the SD image (as a scanner reports a shorter frame).
Calibration: the noise-free data ȳ are reconstructed with the same settings; every output is multiplied by
``mean(input) / mean(noise-free reconstruction)`` over the calibration region (brain mask, else head support), so
the noise-free reconstruction of the input has the input's mean activity there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .projector import Geometry, joseph_matrix, make_geometry, subset_operators
from .recon import FWHM_TO_SIGMA, SinogramBlur, SubsetModel, make_ops, osem, postfilter

MU_WATER_PER_MM = 0.0096
DEFAULT_COUNTS = 3.0e8
MODES = ("independent", "nested")


@dataclass(frozen=True)
class ScannerParams:
    """Acquisition and reconstruction settings (defaults: labelled assumptions, see the module docstring)."""

    counts: float = DEFAULT_COUNTS
    psf_fwhm_mm: float = 4.5
    scatter_fraction: float = 0.30
    randoms_fraction: float = 0.15
    scatter_fwhm_mm: float = 120.0
    mu_per_mm: float = MU_WATER_PER_MM
    n_angles: int | None = None
    iterations: int = 3
    subsets: int = 21
    postfilter_fwhm_mm: float = 5.0
    psf_in_recon: bool = True
    calibrate: bool = True
    disk_cache: bool = True

    def check(self) -> None:
        if not self.counts > 0:
            raise ValueError(f"counts must be > 0, got {self.counts}")
        if not (0 <= self.scatter_fraction < 1 and 0 <= self.randoms_fraction < 1):
            raise ValueError("scatter_fraction and randoms_fraction must be in [0, 1)")
        if self.iterations < 1 or self.subsets < 1:
            raise ValueError("iterations and subsets must be >= 1")
        if min(self.psf_fwhm_mm, self.postfilter_fwhm_mm, self.scatter_fwhm_mm, self.mu_per_mm) < 0:
            raise ValueError("FWHMs and mu must be >= 0")


@dataclass
class SimulationResult:
    """Canonical-orientation volumes (float32, input units) and what was done to make them."""

    ld: np.ndarray
    sd: np.ndarray | None
    noise_free: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)


def head_support(
    activity: np.ndarray, spacing: tuple[float, float, float], threshold: float = 0.02, margin_mm: float = 4.0
) -> np.ndarray:
    """Body/head outline from a PET image: smoothed activity above ``threshold`` × its 99.5th percentile,
    holes filled, dilated by ``margin_mm``. Assumption: the object's outline is where the tracer is.
    """
    sm = ndimage.gaussian_filter(
        np.clip(activity, 0, None).astype(np.float32), sigma=[4.0 * FWHM_TO_SIGMA / s for s in spacing]
    )
    positive = sm[sm > 0]
    if positive.size == 0:
        return np.zeros(activity.shape, bool)
    support = sm > threshold * float(np.percentile(positive, 99.5))
    support = ndimage.binary_fill_holes(support)
    if margin_mm > 0:
        radius = [max(1, int(round(margin_mm / s))) for s in spacing]
        structure = _ellipsoid(radius)
        support = ndimage.binary_dilation(support, structure=structure)
    return support


def _ellipsoid(radius: list[int]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(-r, r + 1) / max(r, 1) for r in radius], indexing="ij")
    return sum(g**2 for g in grids) <= 1.0


def blur_sinogram(sino: np.ndarray, sigma_bins: float, sigma_planes: float) -> np.ndarray:
    """Gaussian blur of a full ``(angles, bins, planes)`` sinogram, zero padded (the recon operators' convention)."""
    from .recon import gaussian_kernel1d

    out = sino
    if sigma_bins > 0:
        out = ndimage.correlate1d(out, gaussian_kernel1d(sigma_bins), axis=1, mode="constant")
    if sigma_planes > 0 and out.shape[2] > 1:
        out = ndimage.correlate1d(out, gaussian_kernel1d(sigma_planes), axis=2, mode="constant")
    return out


class PlaneStackScanner:
    """The acquisition model for one activity volume: expected data, noise draws, and matching reconstructions."""

    def __init__(
        self,
        activity: np.ndarray,
        spacing: tuple[float, float, float],
        mu_map: np.ndarray,
        params: ScannerParams = ScannerParams(),
        backend: str = "numpy",
        device: str | None = None,
    ):
        params.check()
        if activity.ndim != 3:
            raise ValueError(f"activity must be 3D, got shape {activity.shape}")
        self.params, self.spacing, self.shape = params, tuple(float(s) for s in spacing), activity.shape
        activity = np.clip(np.nan_to_num(activity.astype(np.float32)), 0, None)
        self.planes = np.nonzero(activity.sum(axis=(0, 1)) > 0)[0]
        if self.planes.size == 0:
            raise ValueError("the activity volume has no positive voxel")
        nx, ny, _ = activity.shape
        dx, dy, dz = self.spacing
        self.geometry: Geometry = make_geometry(nx, ny, dx, dy, params.n_angles, angle_multiple=params.subsets)
        g = self.geometry
        sigma_mm = params.psf_fwhm_mm * FWHM_TO_SIGMA
        self.data_blur = SinogramBlur(sigma_mm / g.bin_mm, sigma_mm / dz)
        recon_blur = self.data_blur if params.psf_in_recon else SinogramBlur(0.0, 0.0)

        full = joseph_matrix(g, params.disk_cache)
        x = self._planes(activity)
        mu = self._planes(np.asarray(mu_map, dtype=np.float32))
        attenuation = np.exp(-(full @ mu)).reshape(g.n_angles, g.n_bins, -1)
        trues = attenuation * blur_sinogram(
            (full @ x).reshape(attenuation.shape), self.data_blur.sigma_bins, self.data_blur.sigma_planes
        )
        self.eta = float(params.counts / trues.sum(dtype=np.float64))
        trues *= self.eta
        per_plane = trues.sum(axis=(0, 1), dtype=np.float64)
        scatter_sigma = params.scatter_fwhm_mm * FWHM_TO_SIGMA
        scatter = blur_sinogram(trues, scatter_sigma / g.bin_mm, scatter_sigma / dz)
        scatter_sum = scatter.sum(axis=(0, 1), dtype=np.float64)
        sf = params.scatter_fraction
        scatter *= np.where(scatter_sum > 0, sf / (1 - sf) * per_plane / np.maximum(scatter_sum, 1e-30), 0.0)
        rf = params.randoms_fraction
        randoms_per_bin = rf / (1 - rf) * (per_plane + scatter.sum(axis=(0, 1))) / (g.n_angles * g.n_bins)
        self.background = (scatter + randoms_per_bin[None, None, :]).astype(np.float32)
        self.weights = (self.eta * attenuation).astype(np.float32)
        self.expected = (trues + self.background).astype(np.float32)
        self.true_counts = float(trues.sum(dtype=np.float64))

        self.operators = subset_operators(g, params.subsets, params.disk_cache)
        self.arith = make_ops(self.operators, recon_blur, backend, device)
        self.model = SubsetModel(self.arith, self.weights, self.background)

    def _planes(self, volume: np.ndarray) -> np.ndarray:
        nx, ny, _ = self.shape
        return np.ascontiguousarray(volume[:, :, self.planes].reshape(nx * ny, -1), dtype=np.float32)

    def reconstruct(self, data: np.ndarray, dose: float = 1.0) -> np.ndarray:
        """OSEM + post-filter of a ``(angles, bins, active planes)`` sinogram; the full canonical volume."""
        planes = osem(self.model, data, self.params.iterations, dose)
        nx, ny, nz = self.shape
        volume = np.zeros(self.shape, np.float32)
        volume[:, :, self.planes] = planes.reshape(nx, ny, -1)
        return postfilter(volume, self.spacing, self.params.postfilter_fwhm_mm)


def draw_counts(
    expected: np.ndarray, drf: float, mode: str, rng: np.random.Generator, want_sd: bool = True
) -> tuple[np.ndarray | None, np.ndarray]:
    """Standard- and low-dose counts from expected standard-dose data ``ȳ``.

    ``nested``: ``y_SD ~ Poisson(ȳ)``, ``y_LD ~ Binomial(y_SD, 1/DRF)`` (so ``y_LD ≤ y_SD`` and
    ``y_LD ~ Poisson(ȳ/DRF)`` exactly). ``independent``: ``y_LD ~ Poisson(ȳ/DRF)``, and ``y_SD`` (if wanted) drawn
    separately. The standard-dose draw always comes first, so a seed gives the same SD counts in both modes.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    want_sd = want_sd or mode == "nested"
    y_sd = rng.poisson(expected) if want_sd else None
    if mode == "nested":
        y_ld = rng.binomial(y_sd, 1.0 / drf)
    else:
        y_ld = rng.poisson(np.asarray(expected, dtype=np.float64) / drf)
    return y_sd, y_ld


def simulate_volume(
    activity: np.ndarray,
    spacing: tuple[float, float, float],
    drf: float,
    *,
    seed: int | None = 0,
    mode: str = "independent",
    params: ScannerParams = ScannerParams(),
    mu_map: np.ndarray | None = None,
    calibration_mask: np.ndarray | None = None,
    return_sd: bool = False,
    backend: str = "numpy",
    device: str | None = None,
    rng: np.random.Generator | None = None,
) -> SimulationResult:
    """Simulate a low-dose (and optionally the matching standard-dose) reconstruction of a canonical volume.

    ``activity``: the noise-free activity (a phantom, or a standard-dose image taken as the truth), ``[x, y, z]``
    canonical. ``mode``: ``independent`` (LD ~ Poisson(ȳ/DRF)) or ``nested`` (LD = binomial thinning of the SD
    counts; implies ``return_sd``). Same ``seed`` → same output. Any DRF > 1.
    """
    if not (isinstance(drf, (int, float)) and math.isfinite(drf) and drf > 1):
        raise ValueError(f"dose reduction factor must be a number > 1, got {drf!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    activity = np.clip(np.nan_to_num(np.asarray(activity, dtype=np.float32)), 0, None)
    support = head_support(activity, spacing)
    if mu_map is None:
        mu_map = np.where(support, np.float32(params.mu_per_mm), np.float32(0.0))
    scanner = PlaneStackScanner(activity, spacing, mu_map, params, backend, device)
    rng = rng if rng is not None else np.random.default_rng(seed)
    want_sd = return_sd or mode == "nested"

    info: dict[str, Any] = {
        "drf": float(drf),
        "mode": mode,
        "seed": seed,
        "backend": scanner.arith.name,
        "params": asdict(params),
        "geometry": asdict(scanner.geometry),
        "eta": scanner.eta,
        "expected_true_counts_sd": scanner.true_counts,
        "expected_prompts_sd": float(scanner.expected.sum(dtype=np.float64)),
    }
    y_sd, y_ld = draw_counts(scanner.expected, drf, mode, rng, want_sd)
    if y_sd is not None:
        info["prompts_sd"] = int(y_sd.sum())
    info["prompts_ld"] = int(y_ld.sum())

    scale = 1.0
    noise_free = None
    if params.calibrate:
        noise_free = scanner.reconstruct(scanner.expected, 1.0)
        region = calibration_mask.astype(bool) if calibration_mask is not None else support
        if not region.any():
            region = activity > 0
        mean_nf = float(noise_free[region].mean())
        scale = float(activity[region].mean()) / mean_nf if mean_nf > 0 else 1.0
        noise_free *= np.float32(scale)
    info["calibration_scale"] = scale

    ld = scanner.reconstruct(y_ld, 1.0 / drf) * np.float32(scale)
    sd = scanner.reconstruct(y_sd, 1.0) * np.float32(scale) if want_sd else None
    return SimulationResult(ld=ld, sd=sd, noise_free=noise_free, info=info)


__all__ = [
    "DEFAULT_COUNTS",
    "MODES",
    "MU_WATER_PER_MM",
    "PlaneStackScanner",
    "ScannerParams",
    "SimulationResult",
    "blur_sinogram",
    "draw_counts",
    "head_support",
    "simulate_volume",
]
