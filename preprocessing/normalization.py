"""Stage 4: intensities to roughly [0, 1], with the numbers that map them back (``original = norm * scale + offset``).

Three methods (``--normalization``):

``shared`` (default): one scale for the subject's PET pair — the 99.5th percentile of the LD PET inside the brain
mask — applied to LD and SD alike, offset 0. One scale keeps the LD→SD relation intact (the network learns
denoising, not a per-volume contrast change) and is all inference needs to go back to original units.
The 99.5th percentile rather than the maximum: a DRF-100 LD PET's maximum is a noise spike.
PET values are **not clipped**: the mapping stays exactly invertible, and hot spots (lesions) above the scale
stay distinguishable instead of being flattened to 1; about 0.5 % of brain voxels (plus any lesion) exceed 1.

``volume``: each PET volume min–max on its own (LD and SD each with their own min and max). The LD PET's min/max
are recorded as the subject's ``scale``/``offset`` (what inference uses to map predictions back). Not the
official code's normalization (that is ``slice``); earlier versions called this method ``paper``, and
manifests and checkpoints that record ``paper`` still load as ``volume`` (:func:`recorded_method`).

``slice``: the official M2Diff data loader (``helping/dataloaders.py``): every 2D slice of LD, SD and T1 min–max
normalized on its own to [0, 1] (:func:`minmax_slices`), separately for each orientation. The cubes keep the
``shared`` scaling (so evaluation, QC and the way back to original units work as for ``shared``) and the T1 cube
is not clipped (a slice's min–max must see the T1's own extremes); the per-slice min–max is applied to the 2D
slices the pipeline writes and, at inference, to each cube slice before sampling. A slice whose max equals its
min (an empty background slice) becomes all zeros. The SD slice's own min/max are unknown at inference, so a
predicted slice goes back with the LD slice's: ``pred = pred_norm · (max_LD − min_LD) + min_LD``, per orientation
and slice, before the orientations are fused (docs/preprocessing.md measures the bias this leaves).

MRI (``shared``, ``volume``): robust min–max between the 0.5th and 99.5th percentiles inside the brain mask,
clipped to [0, 1]: T1 intensities have no physical unit to preserve, and clipping removes bright fat and vessels.
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import dataclass

import numpy as np

METHODS: tuple[str, ...] = ("shared", "volume", "slice")
# names that old manifests/checkpoints may record → what they meant
LEGACY_METHODS: dict[str, str] = {"paper": "volume"}
PET_PERCENTILE = 99.5
MRI_PERCENTILES = (0.5, 99.5)
_warned_legacy: set[str] = set()


def recorded_method(name: str) -> str:
    """A normalization name read from a manifest, ``subject.json`` or checkpoint → the current name.

    Legacy ``paper`` (the per-volume min–max, which the official code does not use) → ``volume``, with one
    ``FutureWarning`` per process. Unknown names are a ``ValueError`` naming the choices.
    """
    text = str(name).strip().lower()
    if text in LEGACY_METHODS:
        new = LEGACY_METHODS[text]
        if text not in _warned_legacy:
            _warned_legacy.add(text)
            warnings.warn(
                f"normalization {text!r} recorded by an older version means per-volume min-max: read as "
                f"{new!r} (the official per-slice min-max is 'slice')",
                FutureWarning,
                stacklevel=2,
            )
        return new
    if text not in METHODS:
        raise ValueError(f"unknown normalization {name!r}; choose from {', '.join(METHODS)}")
    return text


def cli_method(value: str) -> str:
    """``--normalization`` value → a method name; the retired ``paper`` is refused with a pointer to its new names
    (a name that differs from the paper's method must not be called "paper")."""
    text = str(value).strip().lower()
    if text in LEGACY_METHODS:
        raise argparse.ArgumentTypeError(
            f"'{text}' was renamed: per-volume min-max is now 'volume'; the official per-slice min-max is 'slice' "
            f"(choose from {', '.join(METHODS)})"
        )
    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"invalid choice {value!r} (choose from {', '.join(METHODS)})")
    return text


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
    """Per-volume min–max (the ``volume`` method)."""
    lo, hi = float(np.min(volume)), float(np.max(volume))
    return Scaling(scale=_safe_scale(hi - lo), offset=lo)


def mri_scaling(
    mri: np.ndarray, mask: np.ndarray | None, percentiles: tuple[float, float] = MRI_PERCENTILES
) -> Scaling:
    values = mri[mask] if mask is not None and mask.any() else mri[mri > 0] if (mri > 0).any() else mri.ravel()
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    return Scaling(scale=_safe_scale(hi - lo), offset=lo)


def normalize_mri(mri: np.ndarray, scaling: Scaling, clip: bool = True) -> np.ndarray:
    """Robust-scaled T1, clipped to [0, 1] unless ``clip`` is False (``slice``: each slice's min–max needs the
    unclipped values; a positive affine map does not change a slice's min–max result)."""
    scaled = scaling.apply(mri)
    return np.clip(scaled, 0.0, 1.0) if clip else scaled


def pet_scalings(
    method: str, ld_pet: np.ndarray, sd_pet: np.ndarray | None, mask: np.ndarray
) -> tuple[Scaling, Scaling | None]:
    """The (LD, SD) cube scalings for ``method``; the LD one is what the manifest records.

    ``slice`` cubes use the ``shared`` scaling: one positive scale, offset 0, so the cube is original units up to a
    factor (fusion and the clamp at 0 mean the same in both) and per-slice min–max of a cube slice equals that of
    the original slice."""
    if method in ("shared", "slice"):
        ld = shared_scaling(ld_pet, mask)
        return ld, (ld if sd_pet is not None else None)
    if method == "volume":
        return minmax_scaling(ld_pet), (minmax_scaling(sd_pet) if sd_pet is not None else None)
    raise ValueError(f"unknown normalization {method!r}; choose from {', '.join(METHODS)}")


@dataclass(frozen=True)
class SliceRange:
    """Per-slice min and max of an ``(N, H, W)`` stack — the official loader's per-slice min–max and its inverse
    ``original = normalized · (hi − lo) + lo``, slice by slice. Arithmetic in float64, results float32: a
    non-degenerate slice's min maps to exactly 0 and its max to exactly 1. A slice with ``hi == lo`` (constant,
    e.g. empty background) normalizes to zeros and inverts to its constant value."""

    lo: np.ndarray  # (N,) float64
    hi: np.ndarray  # (N,) float64

    @classmethod
    def of(cls, stack: np.ndarray) -> SliceRange:
        flat = np.asarray(stack).reshape(len(stack), -1)
        return cls(lo=flat.min(axis=1).astype(np.float64), hi=flat.max(axis=1).astype(np.float64))

    @property
    def span(self) -> np.ndarray:
        return self.hi - self.lo

    def _expand(self, values: np.ndarray, ndim: int) -> np.ndarray:
        return values.reshape((-1,) + (1,) * (ndim - 1))

    def apply(self, stack: np.ndarray) -> np.ndarray:
        stack = np.asarray(stack, dtype=np.float64)
        lo, span = self._expand(self.lo, stack.ndim), self._expand(self.span, stack.ndim)
        safe = np.where(span > 0, span, 1.0)
        return np.where(span > 0, (stack - lo) / safe, 0.0).astype(np.float32)

    def invert(self, normalized: np.ndarray) -> np.ndarray:
        normalized = np.asarray(normalized, dtype=np.float64)
        lo, span = self._expand(self.lo, normalized.ndim), self._expand(self.span, normalized.ndim)
        return (normalized * span + lo).astype(np.float32)


def minmax_slices(stack: np.ndarray) -> tuple[np.ndarray, SliceRange]:
    """``(N, H, W)`` → each slice min–max normalized to [0, 1] (degenerate slices: zeros), and the ranges that
    map it back. The one implementation the pipeline's slice writer and inference share."""
    ranges = SliceRange.of(stack)
    return ranges.apply(stack), ranges
