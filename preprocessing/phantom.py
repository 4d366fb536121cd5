"""Demo-cohort phantoms on real anatomy: MNI152 2009 tissue maps → per-subject anatomy, FDG-like activity, pathology.

Anatomy: the MNI ICBM152 2009 T1, grey matter (GM), white matter (WM) and brain mask shipped in the nilearn wheel
(offline). CSF ≈ mask − GM − WM. Assumption: the template is skull-stripped, so the head around the brain is a
synthetic 10 mm shell (skull + scalp) used for attenuation and a faint scalp uptake.
T1 style ``head`` (default): the subject's T1 looks like a scanner T1, not a skull-stripped template — extra-cerebral
CSF, a skull with dark cortical bone and brighter marrow (diploë), a scalp of skin/muscle and bright fat, and a
neck below the brain, on a larger field of view, with a strong bias field, gamma/contrast variation, an arbitrary
intensity unit and Rician-like noise (:func:`head_t1`). A network trained only on skull-stripped T1s sees bright
scalp and neck as unknown input and the MRI then hurts; ``stripped`` keeps the old template-like T1 to measure it.
Variation ``heldout`` (:data:`HELDOUT_VARIATION`): anatomy outside the training distribution for a held-out test
set — stronger warps, other head sizes, enlarged ventricles, cortical atrophy and a hemispheric asymmetry.
Distinct subjects: a smooth random diffeomorphism per subject (stationary velocity field, Gaussian-smoothed noise,
exponentiated by scaling and squaring; Jacobian determinant checked > 0) applied to every map of that subject,
plus T1 intensity jitter (gain, gamma, bias field, noise) and PET jitter (WM level, GM/WM ratio, smooth uptake
heterogeneity). Pathology lives only in the PET: Alzheimer-like hypometabolism (posterior cingulate/precuneus,
temporoparietal, lateral temporal GM; regions placed by MNI coordinates, asymmetric) and small hot and cold
spherical lesions; their masks are returned so evaluation can measure them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

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
T1_STYLES = ("head", "stripped")


@dataclass(frozen=True)
class AnatomyVariation:
    """How far a subject's anatomy departs from the template (the ranges the random draws come from).

    ``ventricle_expansion``: peak radial stretch of a Gaussian region (σ 25 mm) around the ventricles (0.4 → the
    lateral ventricles grow by about half); ``atrophy``: the largest fraction of GM partial volume turned into CSF
    (smooth random field: sulcal widening); ``asymmetry``: stretch of one hemisphere against the other.
    """

    max_displacement_mm: float = 6.0
    max_scaling: float = 0.08
    ventricle_expansion: tuple[float, float] = (0.0, 0.0)
    atrophy: tuple[float, float] = (0.0, 0.0)
    asymmetry: tuple[float, float] = (0.0, 0.0)


TRAINING_VARIATION = AnatomyVariation()
# Held-out anatomy (never trained on): stronger warps, heads ±15 %, enlarged ventricles, atrophy, asymmetry.
HELDOUT_VARIATION = AnatomyVariation(max_displacement_mm=10.0, max_scaling=0.15, ventricle_expansion=(0.3, 0.5),
                                     atrophy=(0.15, 0.35), asymmetry=(0.04, 0.08))
VARIATIONS = {"training": TRAINING_VARIATION, "heldout": HELDOUT_VARIATION}

# Assumption: T1 tissue intensities relative to WM (scanner T1-weighted gradient echo, e.g. MPRAGE).
T1_RELATIVE = {"csf": 0.25, "bone": 0.06, "marrow": 0.55, "muscle": 0.45, "fat": 1.15, "skin": 0.55}


@dataclass
class Anatomy:
    """Template maps on one grid (canonical RAS, float32 in [0, 1] except ``t1``), and the grid."""

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    head: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    if f == 1:
        return a
    s = [n // f * f for n in a.shape]
    a = a[: s[0], : s[1], : s[2]]
    return a.reshape(s[0] // f, f, s[1] // f, f, s[2] // f, f).mean(axis=(1, 3, 5))


@lru_cache(maxsize=4)
def load_anatomy(resolution: int = 2, downsample: int = 1) -> Anatomy:
    """MNI152 2009 maps at ``resolution`` mm (1 or 2), optionally block-averaged by ``downsample`` (quick tests)."""
    from nilearn import datasets

    if resolution not in (1, 2):
        raise ValueError(f"resolution must be 1 or 2 mm, got {resolution}")
    t1_img = datasets.load_mni152_template(resolution=resolution)
    maps = {
        "t1": t1_img.get_fdata(),
        "gm": datasets.load_mni152_gm_template(resolution=resolution).get_fdata(),
        "wm": datasets.load_mni152_wm_template(resolution=resolution).get_fdata(),
        "mask": datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(),
    }
    maps = {k: _block_mean(np.clip(v, 0, None).astype(np.float32), downsample) for k, v in maps.items()}
    affine = t1_img.affine.copy()
    if downsample > 1:
        scale = np.diag([downsample, downsample, downsample, 1.0])
        scale[:3, 3] = (downsample - 1) / 2.0
        affine = affine @ scale
    brain = np.clip(maps["mask"], 0, 1)
    gm = np.clip(maps["gm"], 0, 1) * brain
    wm = np.clip(maps["wm"], 0, 1) * brain
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(brain - gm - wm, 0, 1)
    spacing = float(resolution * downsample)
    head = distance_mm(brain <= 0.5, (spacing,) * 3) <= 10.0
    head = ndimage.gaussian_filter(head.astype(np.float32), 2.0 / spacing) > 0.5
    return Anatomy(maps["t1"], gm, wm, csf, brain, head.astype(np.float32), affine)


def distance_mm(region: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each voxel of ``region`` to the nearest voxel outside it (0 outside): fast morphology."""
    return ndimage.distance_transform_edt(region, sampling=spacing).astype(np.float32)


# --- random diffeomorphisms -------------------------------------------------------------------------------------

def random_displacement(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator,
                        max_displacement_mm: float = 5.0, smoothness_mm: float = 20.0, coarse_mm: float = 6.0,
                        squarings: int = 6) -> np.ndarray:
    """A smooth random diffeomorphism as a pull-back displacement field ``(3, X, Y, Z)`` in voxels.

    A stationary velocity field (Gaussian-smoothed white noise on a coarse grid, scaled so its largest vector is
    ``max_displacement_mm``) is exponentiated by scaling and squaring, then upsampled linearly to ``shape``.
    """
    extent = np.array(shape) * np.array(spacing)
    coarse = tuple(int(max(4, math.ceil(e / coarse_mm))) for e in extent)
    velocity = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), smoothness_mm / coarse_mm,
                                                 mode="nearest") for _ in range(3)]).astype(np.float64)
    norm = np.sqrt((velocity**2).sum(axis=0)).max()
    velocity *= (max_displacement_mm / coarse_mm) / max(norm, 1e-12)  # in coarse voxels
    disp = velocity / (2**squarings)
    grid = np.indices(coarse, dtype=np.float64)
    for _ in range(squarings):
        coords = grid + disp
        disp = disp + np.stack([ndimage.map_coordinates(disp[c], coords, order=1, mode="nearest") for c in range(3)])
    full = []
    for c in range(3):
        up = ndimage.zoom(disp[c], [n / m for n, m in zip(shape, coarse)], order=1, grid_mode=False)
        full.append(up * (coarse_mm / spacing[c]))
    return np.stack(full).astype(np.float32)


def with_scaling(displacement: np.ndarray, scales, centre) -> np.ndarray:
    """Compose a pull-back displacement with an axis scaling about ``centre`` (head-size variation).

    The composite maps ``x → S (x + u(x) − c) + c``; its Jacobian is ``S (I + ∇u)``, still positive.
    """
    grid = np.indices(displacement.shape[1:], dtype=np.float32)
    out = np.empty_like(displacement)
    for a in range(3):
        out[a] = scales[a] * (grid[a] + displacement[a] - centre[a]) + centre[a] - grid[a]
    return out


def jacobian_determinant(displacement: np.ndarray) -> np.ndarray:
    """det(I + ∇u) of a voxel-unit displacement field ``(3, X, Y, Z)``; > 0 everywhere means invertible."""
    grads = [np.gradient(displacement[c]) for c in range(3)]
    j = np.empty((3, 3) + displacement.shape[1:], np.float64)
    for r in range(3):
        for c in range(3):
            j[r, c] = grads[r][c] + (1.0 if r == c else 0.0)
    return np.linalg.det(np.moveaxis(j, (0, 1), (-2, -1)))


def warp(volume: np.ndarray, displacement: np.ndarray, order: int = 1) -> np.ndarray:
    """``volume(x + u(x))``: pull a volume through a displacement field (zero outside)."""
    coords = np.indices(volume.shape, dtype=np.float32) + displacement
    return ndimage.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0).astype(np.float32)


def smooth_field(shape, spacing, rng: np.random.Generator, smoothness_mm: float, amplitude: float) -> np.ndarray:
    """A smooth zero-mean random field with max |value| = ``amplitude`` (bias fields, uptake heterogeneity)."""
    coarse = tuple(max(4, int(math.ceil(n * s / 8.0))) for n, s in zip(shape, spacing))
    f = ndimage.gaussian_filter(rng.standard_normal(coarse), smoothness_mm / 8.0, mode="nearest")
    f = ndimage.zoom(f, [n / m for n, m in zip(shape, coarse)], order=1, grid_mode=False)
    f -= f.mean()
    return (f * (amplitude / max(np.abs(f).max(), 1e-12))).astype(np.float32)


def rigid_matrix(angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                 centre_mm: np.ndarray) -> np.ndarray:
    """4×4 rotation about ``centre_mm`` (x, then y, then z axis) followed by a translation, in world mm."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre_mm - rot @ centre_mm + np.asarray(translation_mm)
    return m


# --- one subject -------------------------------------------------------------------------------------------------

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
    r = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, centre_vox, spacing)))
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


def radial_expansion(shape, spacing, centre_vox, amount: float, sigma_mm: float) -> np.ndarray:
    """Pull-back displacement (voxels) that stretches a Gaussian neighbourhood of ``centre_vox`` by ``amount``.

    ``u(x) = −a (x − c) exp(−|x − c|² / 2σ²)``: the volume at ``x`` is read from nearer the centre, so what lies
    there grows; its Jacobian at the centre is ``(1 − a)³`` and stays positive for ``a < 1``.
    """
    sp = np.asarray(spacing, np.float32)[:, None, None, None]
    offset = (np.indices(shape, dtype=np.float32) - np.asarray(centre_vox, np.float32)[:, None, None, None]) * sp
    g = np.exp(-0.5 * (offset**2).sum(axis=0) / sigma_mm**2)
    return (-amount * offset * g / sp).astype(np.float32)


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """Pull-back displacement of ``x → φ_first(φ_then(x))``: warp by ``first`` in template space, then by ``then``."""
    coords = np.indices(then.shape[1:], dtype=np.float32) + then
    return (then + np.stack([ndimage.map_coordinates(first[c], coords, order=1, mode="nearest")
                             for c in range(3)])).astype(np.float32)


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


def make_subject(anatomy: Anatomy, rng: np.random.Generator, kind: str = "healthy",
                 max_displacement_mm: float = 6.0, max_scaling: float = 0.08, max_rotation_deg: float = 4.0,
                 max_translation_mm: float = 6.0, variation: AnatomyVariation | None = None,
                 t1_style: str = "head") -> SubjectPhantom:
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
    rng_warp, rng_pet, rng_path, rng_t1, rng_anat = (np.random.default_rng(s) for s in
                                                     np.random.SeedSequence(int(rng.integers(2**63))).spawn(5))
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
    info["max_displacement_mm"] = float(np.sqrt(((disp * np.asarray(spacing)[:, None, None, None]) ** 2)
                                                .sum(axis=0)).max())

    gm, wm, csf = warp(anatomy.gm, disp), warp(anatomy.wm, disp), warp(anatomy.csf, disp)
    brain, head = warp(anatomy.brain, disp), warp(anatomy.head, disp) > 0.5
    t1_template = warp(anatomy.t1, disp)
    if variation.atrophy[1] > 0:
        # Cortical atrophy: part of the GM partial volume becomes CSF (sulcal widening), in the PET and the T1.
        level = float(rng_anat.uniform(*variation.atrophy))
        field_ = 0.5 + 0.5 * smooth_field(shape, spacing, rng_anat, 30.0, 1.0)
        loss = gm * level * field_
        gm, csf = gm - loss, csf + loss
        gm_level, csf_level, _ = _t1_levels(anatomy)
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
        radius_scale = max(1.0, spacing[0] / 2.0)
        inner = distance_mm(brain > 0.5, spacing) > 12.0
        candidates = inner & ((gm + wm) > 0.8)
        n_hot, n_cold = int(rng_path.integers(1, 3)), int(rng_path.integers(1, 3))
        centres = _lesion_centres(candidates, spacing, rng_path, n_hot + n_cold, min_gap_mm=25.0)
        hot = np.zeros(shape, np.float32)
        cold = np.zeros(shape, np.float32)
        lesions = []
        for i, c in enumerate(centres):
            radius = float(rng_path.uniform(4.0, 7.0) * radius_scale)
            profile = _sphere_profile(shape, spacing, c, radius)
            if i < n_hot:
                level = float(rng_path.uniform(2.0, 3.0) * ratio * wm_level)
                activity = activity * (1 - profile) + np.maximum(activity, level) * profile
                hot = np.maximum(hot, profile)
                lesions.append({"type": "hot", "centre_vox": c.tolist(), "radius_mm": round(radius, 2)})
            else:
                activity = activity * (1.0 - 0.85 * profile)
                cold = np.maximum(cold, profile)
                lesions.append({"type": "cold", "centre_vox": c.tolist(), "radius_mm": round(radius, 2)})
        masks["lesion_hot"], masks["lesion_cold"] = hot >= 0.5, cold >= 0.5
        info["lesions"] = lesions

    skull = head & (distance_mm(brain <= 0.5, spacing) > 2.0) & ~scalp
    mu = np.where(head, MU_WATER_PER_MM, 0.0).astype(np.float32)
    mu[skull] = MU_BONE_PER_MM

    t1, t1_affine, rigid, t1_info = _misaligned_t1(t1_template, anatomy.affine, rng_t1, max_rotation_deg,
                                                    max_translation_mm, brain, t1_style,
                                                    _t1_levels(anatomy)[2])
    info.update(t1_info)
    masks = {k: v.astype(np.uint8) for k, v in masks.items()}
    return SubjectPhantom(activity, mu, t1, t1_affine, anatomy.affine.copy(), masks, disp, info)


def _t1_levels(anatomy: Anatomy) -> tuple[float, float, float]:
    """Template T1 means in pure GM, CSF-dominated brain voxels and pure WM (the units the template is in)."""
    brain = anatomy.brain > 0.5
    gm = float(anatomy.t1[(anatomy.gm > 0.9) & brain].mean())
    csf = float(anatomy.t1[(anatomy.csf > 0.8) & brain].mean())
    wm = float(anatomy.t1[(anatomy.wm > 0.9) & brain].mean())
    return gm, csf, wm


def head_t1(t1_brain: np.ndarray, brain: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
            wm_level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
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
    thick = {"csf": rng.uniform(2.0, 4.0), "skull": rng.uniform(5.0, 9.0), "scalp": rng.uniform(4.0, 8.0),
             "skin": 1.5, "fat": rng.uniform(3.0, 7.0)}
    inside = brain_p > 0.5
    d_out = distance_mm(~inside, spacing)
    shell = d_out <= thick["csf"] + thick["skull"] + thick["scalp"]

    ijk = np.indices(shape, dtype=np.float32)
    stem = np.argwhere(inside[:, :, below: below + 3])
    cx, cy = stem[:, 0].mean(), stem[:, 1].mean()
    rx, ry = rng.uniform(48.0, 62.0), rng.uniform(50.0, 65.0)
    forward = rng.uniform(5.0, 15.0)  # the neck sits a little anterior to the spinal cord
    ell = (((ijk[0] - cx) * spacing[0] / rx) ** 2 + ((ijk[1] - cy) * spacing[1] - forward) ** 2 / ry**2)
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
    info = {"t1_head_mm": {k: round(float(v), 2) for k, v in thick.items()},
            "t1_neck_radii_mm": [round(float(rx), 1), round(float(ry), 1)]}
    return img.astype(np.float32), grid_affine, head, info


def _misaligned_t1(t1: np.ndarray, pet_affine: np.ndarray, rng: np.random.Generator, max_rotation_deg: float,
                   max_translation_mm: float, brain: np.ndarray, style: str = "head", wm_level: float = 1.0):
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
    resampled = ndimage.affine_transform(img, vox_to_grid_vox[:3, :3], offset=vox_to_grid_vox[:3, 3],
                                         output_shape=t1_shape, order=1, mode="constant", cval=0.0)
    if noise_sigma > 0:  # magnitude image: Rician noise, so air is a noise floor, not zeros
        resampled = np.hypot(resampled + rng.normal(0.0, noise_sigma, resampled.shape),
                             rng.normal(0.0, noise_sigma, resampled.shape))
    info.update({"t1_rotation_deg": [round(a, 3) for a in angles],
                 "t1_translation_mm": [round(t, 3) for t in translation],
                 "t1_rigid_world": rigid.round(6).tolist(), "t1_gain": round(float(gain), 3),
                 "t1_gamma": round(float(gamma), 3)})
    return resampled.astype(np.float32), t1_affine, rigid, info
