"""The demo phantoms' anatomy: MNI152 2009 tissue maps (:class:`Anatomy`) and how far subjects depart from them.

Anatomy: the MNI ICBM152 2009 T1, grey matter (GM), white matter (WM) and brain mask shipped in the nilearn wheel
(offline). CSF ≈ mask − GM − WM. Assumption: the template is skull-stripped, so the head around the brain is a
synthetic 10 mm shell (skull + scalp) used for attenuation and a faint scalp uptake.
Variation ``heldout`` (:data:`HELDOUT_VARIATION`): anatomy outside the training distribution for a held-out test
set — stronger warps, other head sizes, enlarged ventricles, cortical atrophy and a hemispheric asymmetry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from .phantom_warps import distance_mm


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
HELDOUT_VARIATION = AnatomyVariation(
    max_displacement_mm=10.0,
    max_scaling=0.15,
    ventricle_expansion=(0.3, 0.5),
    atrophy=(0.15, 0.35),
    asymmetry=(0.04, 0.08),
)
VARIATIONS = {"training": TRAINING_VARIATION, "heldout": HELDOUT_VARIATION}


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
