"""The MRI channel keeps the brain and a thin margin only: skull, scalp, neck and air noise never reach the network."""

from __future__ import annotations

import numpy as np

from preprocessing.cubes import prepare_cubes
from preprocessing.mri_window import MRI_BRAIN_MARGIN_MM, brain_window


def _head(n: int = 48, spacing: float = 4.0):
    """A PET with a bright brain ball and a T1 of the same brain, stripped and with a bright scalp shell + noise."""
    r = np.sqrt(sum((g - n / 2) ** 2 for g in np.indices((n,) * 3))) * spacing
    pet = np.where(r < 50, 10.0, 0.5).astype(np.float32)
    stripped = np.where(r < 50, 1.0 - 0.7 * (r < 20), 0.0).astype(np.float32)
    rng = np.random.default_rng(0)
    head = stripped + np.where((r > 62) & (r < 75), 1.3, 0.0) + np.abs(rng.normal(0, 0.01, r.shape))
    return pet, stripped, head.astype(np.float32), r


def test_window_is_one_inside_margin_and_zero_beyond_ramp():
    mask = np.zeros((30, 30, 30), bool)
    mask[10:20, 10:20, 10:20] = True
    w = brain_window(mask, (2.0, 2.0, 2.0), margin_mm=4.0, ramp_mm=4.0)
    assert np.all(w[mask] == 1.0)
    assert w[15, 15, 21] == 1.0  # 4 mm outside (2 voxels): within the margin
    assert w[15, 15, 22] == 0.5  # 6 mm outside: halfway down the ramp
    assert w[15, 15, 24] == 0.0  # 10 mm outside: beyond margin + ramp
    assert np.all(brain_window(np.zeros((4, 4, 4), bool), (1, 1, 1)) == 1.0)


def test_with_skull_and_stripped_t1_give_the_same_mri_channel_near_the_brain():
    pet, stripped, head, r = _head()
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    a = prepare_cubes(pet, affine, normalization="shared", size=48, mri=stripped)
    b = prepare_cubes(pet, affine, normalization="shared", size=48, mri=head)
    brain = a.mask > 0
    assert np.all(b.mri[r > 50 + MRI_BRAIN_MARGIN_MM + 8] == 0)  # the bright scalp is gone
    # Inside the brain the two channels agree up to the noise (the normalization percentiles are in-brain).
    assert np.abs(a.mri[brain] - b.mri[brain]).mean() < 0.05
