"""Low-dose PET simulation: a per-plane 2D PET acquisition model (Joseph projector, attenuation, PSF, scatter and
randoms, Poisson counts, binomial thinning) and OSEM reconstruction, batched over all axial planes.

Entry points: :func:`simulate_volume` (canonical numpy volumes) and :func:`simulate_image` (a NIfTI image on its own
grid, any orientation; reoriented with :mod:`m2diff_monai.data.grid`). See ``docs/simulation-and-demo.md`` for the
model and its assumptions.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from m2diff_monai.data import grid

from .forward_model import (
    DEFAULT_COUNTS,
    MODES,
    MU_WATER_PER_MM,
    PlaneStackScanner,
    ScannerParams,
    SimulationResult,
    draw_counts,
    head_support,
    simulate_volume,
)


def float_image_like(data: np.ndarray, reference: nib.Nifti1Image) -> nib.Nifti1Image:
    """A float32 image with ``reference``'s grid (shape, affine, units metadata)."""
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    out = nib.Nifti1Image(np.asarray(data, dtype=np.float32), reference.affine, header)
    out.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    out.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    out.header.set_slope_inter(1.0, 0.0)
    return out


def simulate_image(
    image: nib.Nifti1Image,
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
) -> tuple[nib.Nifti1Image, nib.Nifti1Image | None, dict[str, Any]]:
    """Low-dose (and optionally standard-dose) images on ``image``'s own grid and in its units.

    ``mu_map`` (1/mm) and ``calibration_mask`` are arrays on the same grid, in the image's voxel order.
    Axial planes are those of the canonical orientation closest to the image's axes.
    """
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine
    activity = grid.to_canonical(data, affine)[0]
    spacing = grid.canonical_spacing(affine, image.header.get_zooms()[:3])
    mu_c = None if mu_map is None else grid.to_canonical(np.asarray(mu_map, np.float32), affine)[0]
    mask_c = None if calibration_mask is None else grid.to_canonical(np.asarray(calibration_mask), affine)[0]
    result = simulate_volume(
        activity,
        spacing,
        drf,
        seed=seed,
        mode=mode,
        params=params,
        mu_map=mu_c,
        calibration_mask=mask_c,
        return_sd=return_sd,
        backend=backend,
        device=device,
    )
    ld = float_image_like(grid.from_canonical(result.ld, affine), image)
    sd = None if result.sd is None else float_image_like(grid.from_canonical(result.sd, affine), image)
    return ld, sd, result.info


__all__ = [
    "DEFAULT_COUNTS",
    "MODES",
    "MU_WATER_PER_MM",
    "PlaneStackScanner",
    "ScannerParams",
    "SimulationResult",
    "draw_counts",
    "float_image_like",
    "head_support",
    "simulate_image",
    "simulate_volume",
]
