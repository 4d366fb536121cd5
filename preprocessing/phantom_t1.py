"""The demo subjects' T1: scanner-like appearance around the template brain, intensity jitter, rigid misplacement.

T1 style ``head`` (default): the subject's T1 looks like a scanner T1, not a skull-stripped template — extra-cerebral
CSF, a skull with dark cortical bone and brighter marrow (diploë), a scalp of skin/muscle and bright fat, and a
neck below the brain, on a larger field of view, with a strong bias field, gamma/contrast variation, an arbitrary
intensity unit and Rician-like noise (:func:`head_t1`). A network trained only on skull-stripped T1s sees bright
scalp and neck as unknown input and the MRI then hurts; ``stripped`` keeps the old template-like T1 to measure it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage

from .phantom_anatomy import Anatomy
from .phantom_warps import distance_mm, rigid_matrix, smooth_field

T1_STYLES = ("head", "stripped")
# Assumption: T1 tissue intensities relative to WM (scanner T1-weighted gradient echo, e.g. MPRAGE).
T1_RELATIVE = {"csf": 0.25, "bone": 0.06, "marrow": 0.55, "muscle": 0.45, "fat": 1.15, "skin": 0.55}


def t1_levels(anatomy: Anatomy) -> tuple[float, float, float]:
    """Template T1 means in pure GM, CSF-dominated brain voxels and pure WM (the units the template is in)."""
    brain = anatomy.brain > 0.5
    gm = float(anatomy.t1[(anatomy.gm > 0.9) & brain].mean())
    csf = float(anatomy.t1[(anatomy.csf > 0.8) & brain].mean())
    wm = float(anatomy.t1[(anatomy.wm > 0.9) & brain].mean())
    return gm, csf, wm


def head_t1(
    t1_brain: np.ndarray, brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator, wm_level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """A scanner-like T1 around a skull-stripped brain, on a padded grid (WM = 1, no noise or bias yet).

    Layers outward from the brain (thicknesses drawn per subject): extra-cerebral CSF; skull with dark inner and
    outer tables and brighter marrow (diploë); scalp (muscle/galea, bright subcutaneous fat, skin). Below the
    brain a neck (elliptic cylinder of muscle under fat and skin, a vertebral column around the spinal cord).
    Returns the image, the padded grid's affine, the head mask and what was drawn. Intensities are
    :data:`T1_RELATIVE`. Assumption: geometry only roughly human; what matters is that the T1 shows bright and
    dark non-brain tissue of realistic size and contrast around and below the brain.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    pad = [int(math.ceil(28.0 / s)) for s in spacing]
    below = int(math.ceil(70.0 / spacing[2]))
    widths = ((pad[0], pad[0]), (pad[1], pad[1]), (below, pad[2]))
    brain_p = np.pad(brain, widths)
    img_brain = np.pad(t1_brain, widths) / wm_level
    grid_affine = affine.copy()
    grid_affine[:3, 3] = affine[:3, :3] @ -np.array([pad[0], pad[1], below], float) + affine[:3, 3]
    shape = brain_p.shape
    thick = {
        "csf": rng.uniform(2.0, 4.0),
        "skull": rng.uniform(5.0, 9.0),
        "scalp": rng.uniform(4.0, 8.0),
        "skin": 1.5,
        "fat": rng.uniform(3.0, 7.0),
    }
    inside = brain_p > 0.5
    d_out = distance_mm(~inside, spacing)
    shell = d_out <= thick["csf"] + thick["skull"] + thick["scalp"]

    ijk = np.indices(shape, dtype=np.float32)
    stem = np.argwhere(inside[:, :, below : below + 3])
    cx, cy = stem[:, 0].mean(), stem[:, 1].mean()
    rx, ry = rng.uniform(48.0, 62.0), rng.uniform(50.0, 65.0)
    forward = rng.uniform(5.0, 15.0)  # the neck sits a little anterior to the spinal cord
    ell = ((ijk[0] - cx) * spacing[0] / rx) ** 2 + ((ijk[1] - cy) * spacing[1] - forward) ** 2 / ry**2
    neck = (ell <= 1.0) & (ijk[2] < below + 20.0 / spacing[2])
    head = ndimage.gaussian_filter((shell | neck | inside).astype(np.float32), 3.0 / spacing[0]) > 0.5
    d_head = distance_mm(head, spacing)
    rel = T1_RELATIVE
    img = np.zeros(shape, np.float32)
    img[head] = rel["muscle"]
    img[head & (d_head <= thick["skin"] + thick["fat"])] = rel["fat"]
    img[head & (d_head <= thick["skin"])] = rel["skin"]
    # Spinal cord, CSF around it and the vertebral column, below the brain.
    r_cord = np.sqrt(((ijk[0] - cx) * spacing[0]) ** 2 + ((ijk[1] - cy) * spacing[1]) ** 2)
    low = ijk[2] < below
    img[low & (r_cord <= 18.0)] = rel["marrow"]
    img[low & (r_cord <= 18.0) & (r_cord > 15.0)] = rel["bone"]
    img[low & (r_cord <= 9.0)] = rel["csf"]
    img[low & (r_cord <= 5.0)] = 0.85  # cord: roughly WM-like
    skull = (d_out > thick["csf"]) & (d_out <= thick["csf"] + thick["skull"]) & ~low
    depth = d_out - thick["csf"]
    img[skull] = rel["marrow"]
    img[skull & ((depth <= 2.0) | (depth > thick["skull"] - 2.0))] = rel["bone"]  # inner and outer tables
    img[(d_out > 0) & (d_out <= thick["csf"]) & ~low] = rel["csf"]
    w = np.clip(brain_p, 0.0, 1.0)
    img = w * img_brain + (1.0 - w) * img
    info = {
        "t1_head_mm": {k: round(float(v), 2) for k, v in thick.items()},
        "t1_neck_radii_mm": [round(float(rx), 1), round(float(ry), 1)],
    }
    return img.astype(np.float32), grid_affine, head, info


def misaligned_t1(
    t1: np.ndarray,
    pet_affine: np.ndarray,
    rng: np.random.Generator,
    max_rotation_deg: float,
    max_translation_mm: float,
    brain: np.ndarray,
    style: str = "head",
    wm_level: float = 1.0,
):
    """The subject's T1 with intensity jitter, on its own grid (larger field of view), rigidly misplaced.

    T1 voxel ``v`` shows the anatomy at PET-world point ``M · A_t1 · v``: registering T1 to PET must recover ``M``.
    ``head``: :func:`head_t1` around the brain, a strong bias field (±30 %), gamma 0.7–1.4, an arbitrary
    intensity unit and Rician noise on the T1's own grid (background noise floor included); ``stripped``: the
    template's brain only, mild jitter (the demo's T1 before realistic heads).
    """
    spacing = np.sqrt((pet_affine[:3, :3] ** 2).sum(axis=0))
    info: dict[str, Any] = {}
    if style == "head":
        img, grid_affine, _, info = head_t1(t1, brain, pet_affine, rng, wm_level)
        gain, gamma = float(np.exp(rng.uniform(np.log(200.0), np.log(3000.0)))), rng.uniform(0.7, 1.4)
        bias = np.exp(smooth_field(img.shape, spacing, rng, 80.0, 0.3))
        img = np.clip(img, 0, None) ** gamma * bias * gain
        t1_shape = img.shape
        grid_centre = grid_affine[:3, :3] @ ((np.array(t1_shape) - 1) / 2.0) + grid_affine[:3, 3]
        noise_sigma = rng.uniform(0.015, 0.04) * gain
    else:
        grid_affine = pet_affine
        gain, gamma = rng.uniform(0.85, 1.15), rng.uniform(0.8, 1.2)
        bias = np.exp(smooth_field(t1.shape, spacing, rng, 60.0, 0.12))
        img = np.clip(t1, 0, None) ** gamma * bias * gain
        img += rng.normal(0.0, 0.01, img.shape).astype(np.float32) * (img > 0.02)
        img = np.clip(img, 0, None) * 1000.0
        shape_pet = np.array(t1.shape)
        t1_shape = tuple(int(math.ceil(n * 1.15)) for n in shape_pet)
        grid_centre = pet_affine[:3, :3] @ ((shape_pet - 1) / 2.0) + pet_affine[:3, 3]
        noise_sigma = 0.0
    t1_affine = np.diag([*spacing, 1.0])
    t1_affine[:3, 3] = grid_centre - spacing * (np.array(t1_shape) - 1) / 2.0 + rng.uniform(-10, 10, 3)
    angles = tuple(float(a) for a in rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    translation = tuple(float(t) for t in rng.uniform(-max_translation_mm, max_translation_mm, 3))
    brain_centre = np.argwhere(brain > 0.5).mean(axis=0)
    rigid = rigid_matrix(angles, translation, pet_affine[:3, :3] @ brain_centre + pet_affine[:3, 3])
    vox_to_grid_vox = np.linalg.inv(grid_affine) @ rigid @ t1_affine
    resampled = ndimage.affine_transform(
        img,
        vox_to_grid_vox[:3, :3],
        offset=vox_to_grid_vox[:3, 3],
        output_shape=t1_shape,
        order=1,
        mode="constant",
        cval=0.0,
    )
    if noise_sigma > 0:  # magnitude image: Rician noise, so air is a noise floor, not zeros
        resampled = np.hypot(
            resampled + rng.normal(0.0, noise_sigma, resampled.shape), rng.normal(0.0, noise_sigma, resampled.shape)
        )
    info.update(
        {
            "t1_rotation_deg": [round(a, 3) for a in angles],
            "t1_translation_mm": [round(t, 3) for t in translation],
            "t1_rigid_world": rigid.round(6).tolist(),
            "t1_gain": round(float(gain), 3),
            "t1_gamma": round(float(gamma), 3),
        }
    )
    return resampled.astype(np.float32), t1_affine, rigid, info
