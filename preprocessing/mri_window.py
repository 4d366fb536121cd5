"""The MRI channel restricted to the brain and a thin margin: a T1's non-brain tissue never reaches the network.

Why: a scanner T1 shows scalp fat, marrow, muscle, neck and air noise whose size, brightness and extent vary with
the scanner, the field of view and the subject, and none of which says anything about brain PET. A network that
saw them in training learns them as nuisance; one that did not (e.g. trained on skull-stripped T1s) meets input it
never saw, and the MRI then hurts (measured on the demo, see bundles/m2diff/README.md). Weighting the normalized
T1 by the PET-derived brain mask dilated by ``margin_mm`` (with a linear ramp of ``ramp_mm``) makes the MRI input
the same for a skull-stripped and a with-skull T1 of one subject, up to the margin. The margin keeps the
cortical edge and the CSF/bone boundary that PET partial volume at the brain edge depends on.
Both training (preprocessing pipeline) and inference call it through :func:`preprocessing.cubes.prepare_cubes`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MRI_BRAIN_MARGIN_MM = 8.0
MRI_BRAIN_RAMP_MM = 4.0


def brain_window(
    mask: np.ndarray, spacing, margin_mm: float = MRI_BRAIN_MARGIN_MM, ramp_mm: float = MRI_BRAIN_RAMP_MM
) -> np.ndarray:
    """Weights in [0, 1]: 1 inside ``mask`` and up to ``margin_mm`` outside it, falling linearly to 0 over
    ``ramp_mm`` (distances in mm on the mask's grid of voxel size ``spacing``). An empty mask keeps everything."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=[float(s) for s in spacing])
    return np.clip(1.0 - (outside - margin_mm) / max(ramp_mm, 1e-6), 0.0, 1.0).astype(np.float32)


__all__ = ["MRI_BRAIN_MARGIN_MM", "MRI_BRAIN_RAMP_MM", "brain_window"]
