"""Low-frequency consistency with the LD PET: the prediction keeps its fine detail, the LD its coarse uptake.

``pred + G_σ * (LD − pred)``: the band below the Gaussian's cut-off comes from the LD PET, everything above it from
the network. Why: the LD PET is an unbiased (noisy) measurement of the same activity, and its noise averages out
under a Gaussian of a few voxels, while a network trained on few subjects can shift the coarse uptake where it
has not seen the anatomy (a held-out head scaled by +7 % in the demo) and shrinks small lesions it rarely saw
(hot −13 %, cold +14 % in the demo). The LD's low band restores both at the price of the LD noise that passes
the filter (more of it the wider the filter's pass band, i.e. the smaller the FWHM).

The same idea as ILVR's low-pass refinement (Choi et al., ICCV 2021, which applies it at every step of the chain)
applied once to the fused 3D volume. Not in the M2Diff or MFdiff papers; off by default (``None``), the demo
recipes turn it on (``ld_consistency_fwhm`` in their ``inference_defaults``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def consistency_sigma(fwhm_mm: float | None, spacing_mm: Sequence[float]) -> tuple[float, ...] | None:
    """Per-axis Gaussian σ in voxels for a FWHM in mm on a grid of ``spacing_mm`` (None: no consistency)."""
    if fwhm_mm is None:
        return None
    spacing = tuple(float(s) for s in spacing_mm)
    if not spacing or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"the cube's voxel size must be positive, got {spacing_mm}")
    return tuple(float(fwhm_mm) / FWHM_PER_SIGMA / s for s in spacing)


def ld_consistency(prediction: np.ndarray, ld: np.ndarray, sigma_voxels: float | Sequence[float]) -> np.ndarray:
    """``prediction + G_σ * (ld − prediction)`` (same units, same grid), float32.

    Linear; a region much wider than the filter takes the LD's mean uptake, detail finer than it stays the
    prediction's. ``mode="nearest"`` so the cube's edges do not pull towards zero.
    """
    prediction = np.asarray(prediction, dtype=np.float32)
    ld = np.asarray(ld, dtype=np.float32)
    if prediction.shape != ld.shape:
        raise ValueError(f"prediction {prediction.shape} and LD PET {ld.shape} must share one grid")
    residual = gaussian_filter(ld - prediction, sigma=sigma_voxels, mode="nearest")
    return (prediction + residual).astype(np.float32)
