"""Stages 3–5 as one step: brain mask → normalization → crop/pad to the training cube.

Training preprocessing (``pipeline``) and inference (``m2diff_monai.inference.preprocess``) must prepare a volume
identically, or a model sees different inputs at test time than in training. Both call :func:`prepare_cubes` on
volumes already registered onto one grid by the one registration step,
:func:`preprocessing.registration.register_to_cube_grid`, whose PET reference differs by caller (training: the SD
PET when there is one; inference: the LD PET).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from m2diff_monai.data.grid import voxel_spacing

from . import crop as crop_stage
from .mask import brain_mask
from .mri_window import brain_window
from .normalization import Scaling, mri_scaling, normalize_mri, pet_scalings


@dataclass
class Cubes:
    """The normalized ``size``³ cubes of one subject and what it takes to map them back to the grid."""

    ld: np.ndarray
    sd: np.ndarray | None
    mri: np.ndarray | None
    mask: np.ndarray  # brain mask on the cube
    grid_mask: np.ndarray  # brain mask on the registered grid the cube was cut from
    box: crop_stage.CropBox
    cube_affine: np.ndarray
    ld_scaling: Scaling
    sd_scaling: Scaling | None
    mri_scaling: Scaling | None


def prepare_cubes(
    ld: np.ndarray,
    affine: np.ndarray,
    *,
    normalization: str,
    size: int,
    sd: np.ndarray | None = None,
    mri: np.ndarray | None = None,
    subject: str | None = None,
    path: str | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Cubes:
    """Mask (from the SD PET when given: it is the cleaner image), normalize and crop volumes on one grid.

    ``on_stage(name)`` is called after "mask", "normalization" and "crop" (the pipeline times its stages with it).
    A brain larger than the cube is an ``InputError`` naming ``subject`` and ``path``.
    """
    report = on_stage or (lambda _name: None)
    mask = brain_mask(sd if sd is not None else ld, voxel_spacing(affine))
    report("mask")

    ld_scaling, sd_scaling = pet_scalings(normalization, ld, sd, mask)
    mri_scale = mri_scaling(mri, mask) if mri is not None else None
    report("normalization")

    box = crop_stage.crop_box(mask, size, subject=subject, path=path, spacing=voxel_spacing(affine))
    cubes = Cubes(
        ld=ld_scaling.apply(crop_stage.crop_or_pad(ld, box)),
        sd=None if sd is None else sd_scaling.apply(crop_stage.crop_or_pad(sd, box)),
        mri=None
        if mri is None
        else normalize_mri(crop_stage.crop_or_pad(mri, box), mri_scale, clip=normalization != "slice")
        * brain_window(crop_stage.crop_or_pad(mask, box), voxel_spacing(affine)),  # no non-brain tissue
        mask=crop_stage.crop_or_pad(mask, box),
        grid_mask=mask,
        box=box,
        cube_affine=crop_stage.cropped_affine(affine, box),
        ld_scaling=ld_scaling,
        sd_scaling=sd_scaling,
        mri_scaling=mri_scale,
    )
    report("crop")
    return cubes
