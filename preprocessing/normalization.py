"""Stage 4: intensities to roughly [0, 1], with the numbers that map them back (``original = norm * scale + offset``).

``shared`` (default): one scale for the subject's PET pair — the 99.5th percentile of the LD PET inside the brain
mask — applied to LD and SD alike, offset 0. One scale keeps the LD→SD relation intact (the network learns
denoising, not a per-volume contrast change) and is all inference needs to go back to original units.
The 99.5th percentile rather than the maximum: a DRF-100 LD PET's maximum is a noise spike.
PET values are **not clipped**: the mapping stays exactly invertible, and hot spots (lesions) above the scale
stay distinguishable instead of being flattened to 1; about 0.5 % of brain voxels (plus any lesion) exceed 1.

``paper``: each volume min–max on its own (what the M2Diff code does). The LD PET's min/max are recorded as
the subject's ``scale``/``offset`` (what inference uses to map predictions back).

MRI: robust min–max between the 0.5th and 99.5th percentiles inside the brain mask, clipped to [0, 1]:
T1 intensities have no physical unit to preserve, and clipping removes bright fat and vessels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS: tuple[str, ...] = ("shared", "paper")
PET_PERCENTILE = 99.5
MRI_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Scaling:
    """``original = normalized * scale + offset``."""

    scale: float
    offset: float = 0.0

    def apply(self, volume: np.ndarray) -> np.ndarray:
        return ((np.asarray(volume, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)).astype(
            np.float32
        )

    def invert(self, normalized: np.ndarray) -> np.ndarray:
        return (np.asarray(normalized, dtype=np.float32) * np.float32(self.scale) + np.float32(self.offset)).astype(
            np.float32
        )

    def as_dict(self) -> dict[str, float]:
        return {"scale": float(self.scale), "offset": float(self.offset)}


def _safe_scale(value: float) -> float:
    return float(value) if np.isfinite(value) and value > 0 else 1.0


def shared_scaling(ld_pet: np.ndarray, mask: np.ndarray, percentile: float = PET_PERCENTILE) -> Scaling:
    """Scale = ``percentile`` of the LD PET inside ``mask`` (whole volume if the mask is empty), offset 0."""
    values = ld_pet[mask] if mask is not None and mask.any() else ld_pet.ravel()
    return Scaling(scale=_safe_scale(float(np.percentile(values, percentile))), offset=0.0)


def minmax_scaling(volume: np.ndarray) -> Scaling:
    """The paper's per-volume min–max."""
    lo, hi = float(np.min(volume)), float(np.max(volume))
    return Scaling(scale=_safe_scale(hi - lo), offset=lo)


def mri_scaling(mri: np.ndarray, mask: np.ndarray | None, percentiles: tuple[float, float] = MRI_PERCENTILES) -> Scaling:
    values = mri[mask] if mask is not None and mask.any() else mri[mri > 0] if (mri > 0).any() else mri.ravel()
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return Scaling(scale=_safe_scale(hi - lo), offset=lo)


def normalize_mri(mri: np.ndarray, scaling: Scaling) -> np.ndarray:
    return np.clip(scaling.apply(mri), 0.0, 1.0)


def pet_scalings(
    method: str, ld_pet: np.ndarray, sd_pet: np.ndarray | None, mask: np.ndarray
) -> tuple[Scaling, Scaling | None]:
    """The (LD, SD) scalings for ``method``; the LD one is what the manifest records."""
    if method == "shared":
        ld = shared_scaling(ld_pet, mask)
        return ld, (ld if sd_pet is not None else None)
    if method == "paper":
        return minmax_scaling(ld_pet), (minmax_scaling(sd_pet) if sd_pet is not None else None)
    raise ValueError(f"unknown normalization {method!r}; choose from {', '.join(METHODS)}")
