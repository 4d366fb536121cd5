"""Demo-cohort phantoms on real anatomy: MNI152 2009 tissue maps → per-subject anatomy, FDG-like activity, pathology.

:func:`make_subject` warps the template anatomy (:mod:`.phantom_anatomy`) into a new subject by a smooth random
diffeomorphism (:mod:`.phantom_warps`) applied to every map of that subject, and builds its PET activity, μ-map,
masks and a misaligned T1 (:mod:`.phantom_t1`: T1 intensity jitter, gain, gamma, bias field, noise). PET jitter:
WM level, GM/WM ratio, smooth uptake heterogeneity. Pathology lives only in the PET: Alzheimer-like
hypometabolism (posterior cingulate/precuneus, temporoparietal, lateral temporal GM; regions placed by MNI
coordinates, asymmetric) and small hot and cold spherical lesions; their masks are returned so evaluation can
measure them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .phantom_anatomy import Anatomy, AnatomyVariation
from .phantom_t1 import T1_STYLES, misaligned_t1, t1_levels
from .phantom_warps import (
    compose,
    distance_mm,
    jacobian_determinant,
    radial_expansion,
    random_displacement,
    smooth_field,
    warp,
    with_scaling,
)

# Assumption: FDG-like levels in Bq/mL (WM ≈ 2.5 kBq/mL; GM ≈ 4 × WM; CSF ≈ 0; scalp 0.6 × WM).
WM_ACTIVITY_BQML = 2500.0
GM_WM_RATIO = 4.0
SCALP_OVER_WM = 0.6
MU_WATER_PER_MM = 0.0096
MU_BONE_PER_MM = 0.0151  # Assumption: cortical bone at 511 keV

# Hypometabolism centres in MNI mm (x, y, z), spread σ (mm), and which hemisphere ("L", "R", or "M" midline).
HYPOMETABOLISM_REGIONS: tuple[tuple[str, tuple[float, float, float], float, str], ...] = (
    ("posterior_cingulate", (0.0, -56.0, 28.0), 11.0, "M"),
    ("temporoparietal_left", (-48.0, -60.0, 30.0), 14.0, "L"),
    ("temporoparietal_right", (48.0, -60.0, 30.0), 14.0, "R"),
    ("lateral_temporal_left", (-58.0, -30.0, -12.0), 12.0, "L"),
    ("lateral_temporal_right", (58.0, -30.0, -12.0), 12.0, "R"),
)
PATHOLOGY_KINDS = ("healthy", "hypometabolism", "lesions", "hypometabolism+lesions")


@dataclass
class SubjectPhantom:
    """One subject on the PET grid (``affine``), plus its T1 on its own grid (``t1_affine``)."""

    activity: np.ndarray
    mu_map: np.ndarray
    t1: np.ndarray
    t1_affine: np.ndarray
    affine: np.ndarray
    masks: dict[str, np.ndarray]
    displacement: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def hypometabolism_map(anatomy: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    """Fractional GM uptake reduction in template space (0 = none), from Gaussian blobs at MNI coordinates."""
    ijk = np.indices(anatomy.shape, dtype=np.float32).reshape(3, -1)
    xyz = (anatomy.affine[:3, :3] @ ijk + anatomy.affine[:3, 3:4]).reshape((3,) + anatomy.shape)
    depth = rng.uniform(0.25, 0.40)
    weaker = rng.choice(["L", "R"])
    asymmetry = rng.uniform(0.4, 0.9)
    reduction = np.zeros(anatomy.shape, np.float32)
    regions = {}
    for name, centre, sigma, side in HYPOMETABOLISM_REGIONS:
        amp = depth * (asymmetry if side == weaker else 1.0) * rng.uniform(0.85, 1.15)
        r2 = sum((xyz[a] - centre[a]) ** 2 for a in range(3))
        reduction = np.maximum(reduction, amp * np.exp(-0.5 * r2 / sigma**2).astype(np.float32))
        regions[name] = round(float(amp), 3)
    return reduction, {"depth": round(depth, 3), "weaker_side": str(weaker), "region_amplitudes": regions}


def _sphere_profile(shape, spacing, centre_vox, radius_mm: float) -> np.ndarray:
    """Soft-edged (1 mm ramp) sphere indicator."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    r = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_vox, spacing, strict=True)))
    return np.clip(radius_mm - r + 0.5, 0.0, 1.0).astype(np.float32)


def _lesion_centres(candidates: np.ndarray, spacing, rng: np.random.Generator, n: int, min_gap_mm: float):
    centres: list[np.ndarray] = []
    idx = np.argwhere(candidates)
    for _ in range(200 * max(n, 1)):
        if len(centres) == n or idx.size == 0:
            break
        c = idx[rng.integers(len(idx))]
        if all(np.sqrt((((c - o) * np.asarray(spacing)) ** 2).sum()) >= min_gap_mm for o in centres):
            centres.append(c)
    return centres


def _add_lesions(
    activity: np.ndarray,
    candidates: np.ndarray,
    spacing,
    rng: np.random.Generator,
    gm_level: float,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict[str, Any]]]:
    """One or two hot (2-3x GM uptake) and one or two cold (-85 %) spheres of radius 4-7 mm (scaled up on grids
    coarser than 2 mm), 25 mm apart inside ``candidates``: the new activity, the masks, their descriptions."""
    shape = activity.shape
    radius_scale = max(1.0, spacing[0] / 2.0)
    n_hot, n_cold = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    centres = _lesion_centres(candidates, spacing, rng, n_hot + n_cold, min_gap_mm=25.0)
    hot = np.zeros(shape, np.float32)
    cold = np.zeros(shape, np.float32)
    lesions = []
    for i, c in enumerate(centres):
        radius = float(rng.uniform(4.0, 7.0) * radius_scale)
        profile = _sphere_profile(shape, spacing, c, radius)
        if i < n_hot:
            level = float(rng.uniform(2.0, 3.0) * gm_level)
            activity = activity * (1 - profile) + np.maximum(activity, level) * profile
            hot = np.maximum(hot, profile)
            lesions.append({"type": "hot", "centre_vox": c.tolist(), "radius_mm": round(radius, 2)})
        else:
            activity = activity * (1.0 - 0.85 * profile)
            cold = np.maximum(cold, profile)
            lesions.append({"type": "cold", "centre_vox": c.tolist(), "radius_mm": round(radius, 2)})
    return activity, {"lesion_hot": hot >= 0.5, "lesion_cold": cold >= 0.5}, lesions


def _anatomy_changes(anatomy: Anatomy, rng: np.random.Generator, variation: AnatomyVariation):
    """Template-space displacement for enlarged ventricles and a hemispheric asymmetry (or None), and its info."""
    spacing, shape = anatomy.spacing, anatomy.shape
    info: dict[str, Any] = {}
    disp = None
    brain = anatomy.brain > 0.5
    if variation.ventricle_expansion[1] > 0:
        deep = brain & (anatomy.csf > 0.5) & (distance_mm(brain, spacing) > 15.0)
        centre = np.argwhere(deep).mean(axis=0) if deep.any() else np.argwhere(brain).mean(axis=0)
        amount = float(rng.uniform(*variation.ventricle_expansion))
        disp = radial_expansion(shape, spacing, centre, amount, 25.0)
        info["ventricle_expansion"] = round(amount, 3)
    if variation.asymmetry[1] > 0:
        side = rng.choice([-1.0, 1.0])
        centre = np.argwhere(brain).mean(axis=0)
        centre[0] += side * 35.0 / spacing[0]
        amount = float(rng.uniform(*variation.asymmetry))
        stretch = radial_expansion(shape, spacing, centre, amount, 40.0)
        disp = stretch if disp is None else compose(disp, stretch)
        info["asymmetry"] = {"enlarged_side": "R" if side > 0 else "L", "amount": round(amount, 3)}
    return disp, info


def make_subject(
    anatomy: Anatomy,
    rng: np.random.Generator,
    kind: str = "healthy",
    max_displacement_mm: float = 6.0,
    max_scaling: float = 0.08,
    max_rotation_deg: float = 4.0,
    max_translation_mm: float = 6.0,
    variation: AnatomyVariation | None = None,
    t1_style: str = "head",
) -> SubjectPhantom:
    """Warp the template into a new subject and build its activity, μ-map, masks and misaligned T1.

    ``variation`` (default: the training one) sets the warp strength, head-size range and the held-out anatomy
    changes; ``t1_style`` is ``head`` (scanner-like T1 with skull, scalp and neck) or ``stripped``.
    """
    if kind not in PATHOLOGY_KINDS:
        raise ValueError(f"kind must be one of {PATHOLOGY_KINDS}, got {kind!r}")
    if t1_style not in T1_STYLES:
        raise ValueError(f"t1_style must be one of {T1_STYLES}, got {t1_style!r}")
    if variation is not None:
        max_displacement_mm, max_scaling = variation.max_displacement_mm, variation.max_scaling
    else:
        variation = AnatomyVariation(max_displacement_mm, max_scaling)
    spacing, shape = anatomy.spacing, anatomy.shape
    info: dict[str, Any] = {"kind": kind, "t1_style": t1_style}
    # Independent streams: the same seed gives the same warp, uptake and T1 whatever the pathology kind.
    rng_warp, rng_pet, rng_path, rng_t1, rng_anat = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(rng.integers(2**63))).spawn(5)
    )
    template_change, change_info = _anatomy_changes(anatomy, rng_anat, variation)
    info.update(change_info)
    for _ in range(5):
        disp = random_displacement(shape, spacing, rng_warp, max_displacement_mm)
        scales = rng_warp.uniform(1.0 - max_scaling, 1.0 + max_scaling, 3)
        disp = with_scaling(disp, scales, centre=np.argwhere(anatomy.brain > 0.5).mean(axis=0))
        if template_change is not None:
            disp = compose(template_change, disp)
        jac = jacobian_determinant(disp)
        if jac.min() > 0.1:
            break
        max_displacement_mm *= 0.7  # a gentler warp until it is clearly invertible
    else:
        raise RuntimeError("could not draw an invertible warp")
    info["jacobian_min"], info["jacobian_max"] = float(jac.min()), float(jac.max())
    info["scaling"] = [round(float(v), 4) for v in scales]
    info["max_displacement_mm"] = float(
        np.sqrt(((disp * np.asarray(spacing)[:, None, None, None]) ** 2).sum(axis=0)).max()
    )

    gm, wm, csf = warp(anatomy.gm, disp), warp(anatomy.wm, disp), warp(anatomy.csf, disp)
    brain, head = warp(anatomy.brain, disp), warp(anatomy.head, disp) > 0.5
    t1_template = warp(anatomy.t1, disp)
    if variation.atrophy[1] > 0:
        # Cortical atrophy: part of the GM partial volume becomes CSF (sulcal widening), in the PET and the T1.
        level = float(rng_anat.uniform(*variation.atrophy))
        field_ = 0.5 + 0.5 * smooth_field(shape, spacing, rng_anat, 30.0, 1.0)
        loss = gm * level * field_
        gm, csf = gm - loss, csf + loss
        gm_level, csf_level, _ = t1_levels(anatomy)
        t1_template = t1_template - loss * (gm_level - csf_level)
        info["atrophy"] = round(level, 3)

    wm_level = WM_ACTIVITY_BQML * rng_pet.uniform(0.8, 1.25)
    ratio = GM_WM_RATIO * rng_pet.uniform(0.9, 1.1)
    heterogeneity = 1.0 + smooth_field(shape, spacing, rng_pet, 25.0, 0.08)
    gm_uptake = ratio * wm_level * heterogeneity
    masks: dict[str, np.ndarray] = {"gm": gm >= 0.5, "wm": wm >= 0.5}
    info.update(wm_activity=round(wm_level, 1), gm_wm_ratio=round(ratio, 3))

    if "hypometabolism" in kind:
        reduction_template, hinfo = hypometabolism_map(anatomy, rng_path)
        reduction = warp(reduction_template, disp)
        gm_uptake = gm_uptake * (1.0 - reduction)
        masks["hypometabolism"] = (reduction >= 0.1) & (gm >= 0.3)
        info["hypometabolism"] = hinfo

    scalp = head & (distance_mm(head, spacing) <= 4.0)
    activity = gm * gm_uptake + wm * wm_level + scalp * (SCALP_OVER_WM * wm_level)
    activity = activity.astype(np.float32)

    if "lesions" in kind:
        candidates = (distance_mm(brain > 0.5, spacing) > 12.0) & ((gm + wm) > 0.8)
        activity, lesion_masks, info["lesions"] = _add_lesions(
            activity, candidates, spacing, rng_path, ratio * wm_level
        )
        masks.update(lesion_masks)

    skull = head & (distance_mm(brain <= 0.5, spacing) > 2.0) & ~scalp
    mu = np.where(head, MU_WATER_PER_MM, 0.0).astype(np.float32)
    mu[skull] = MU_BONE_PER_MM

    t1, t1_affine, rigid, t1_info = misaligned_t1(
        t1_template,
        anatomy.affine,
        rng_t1,
        max_rotation_deg,
        max_translation_mm,
        brain,
        t1_style,
        t1_levels(anatomy)[2],
    )
    info.update(t1_info)
    masks = {k: v.astype(np.uint8) for k, v in masks.items()}
    return SubjectPhantom(activity, mu, t1, t1_affine, anatomy.affine.copy(), masks, disp, info)
