"""Stage 3: a brain mask per subject, used to skip empty slices, centre the crop, set the intensity scale and
restrict metrics.

Method (PET-driven, because every subject has a PET but not every subject has an MRI):
1. smooth the PET (SD when present: far less noise than LD) with a 6 mm FWHM Gaussian;
2. Otsu threshold of the smoothed volume over its positive voxels (scikit-image);
3. binary opening (1 voxel) to cut thin bridges to scalp or neck uptake, keep the largest 26-connected component;
4. fill enclosed holes in 3D (ventricles are cold in FDG) and then slice by slice in axial planes
   (cavities that touch the edge of the volume in 3D are still closed within a plane).
Optionally an MRI-derived mask (same recipe on the registered T1, no hole filling difference) is intersected
(``combine="intersection"``) or unioned (``combine="union"``) with it; the pipeline uses the PET mask alone.

Assumption: the tracer shows the brain brighter than its surroundings (true for FDG and most brain tracers).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from m2diff_monai.data.grid import mask_extent

COMBINE_MODES: tuple[str, ...] = ("pet", "intersection", "union")


def _threshold_mask(volume: np.ndarray, spacing: tuple[float, ...], fwhm_mm: float) -> np.ndarray:
    volume = np.nan_to_num(np.asarray(volume, dtype=np.float32))
    sigma = [fwhm_mm / 2.3548 / max(float(s), 1e-6) for s in spacing]
    smooth = ndimage.gaussian_filter(volume, sigma=sigma)
    positive = smooth[smooth > 0]
    if positive.size < 8 or float(positive.max()) <= float(positive.min()):
        return np.zeros(volume.shape, dtype=bool)
    mask = smooth > threshold_otsu(positive)
    structure = ndimage.generate_binary_structure(3, 1)
    opened = ndimage.binary_opening(mask, structure=structure)
    if opened.any():
        mask = opened
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    for z in range(mask.shape[2]):
        if mask[:, :, z].any():
            mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
    return mask


def brain_mask(
    pet: np.ndarray,
    spacing: tuple[float, ...],
    mri: np.ndarray | None = None,
    combine: str = "pet",
    fwhm_mm: float = 6.0,
) -> np.ndarray:
    """Boolean brain mask on the PET array's grid (see the module docstring for the recipe)."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"unknown combine mode {combine!r}; choose from {', '.join(COMBINE_MODES)}")
    mask = _threshold_mask(pet, spacing, fwhm_mm)
    if combine != "pet" and mri is not None:
        mri_mask = _threshold_mask(mri, spacing, fwhm_mm)
        mask = (mask & mri_mask) if combine == "intersection" else (mask | mri_mask)
    return mask


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """Inclusive (first, last) index of the mask along each axis."""
    extent = mask_extent(mask)
    if extent is None:
        raise ValueError("empty mask has no bounding box")
    return extent


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)
