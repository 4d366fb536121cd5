"""Random smooth geometry for the demo phantoms: diffeomorphic warps, smooth random fields, distances, rigid motion.

Distinct subjects: a smooth random diffeomorphism per subject (stationary velocity field, Gaussian-smoothed noise,
exponentiated by scaling and squaring; Jacobian determinant checked > 0), composed with a head-size scaling and,
for held-out anatomy, local radial expansions (:func:`radial_expansion`, :func:`compose`). Displacements are
pull-back fields ``(3, X, Y, Z)`` in voxels: ``warp(volume, u)(x) = volume(x + u(x))``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage


def distance_mm(region: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each voxel of ``region`` to the nearest voxel outside it (0 outside): fast morphology."""
    return ndimage.distance_transform_edt(region, sampling=spacing).astype(np.float32)


def random_displacement(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    rng: np.random.Generator,
    max_displacement_mm: float = 5.0,
    smoothness_mm: float = 20.0,
    coarse_mm: float = 6.0,
    squarings: int = 6,
) -> np.ndarray:
    """A smooth random diffeomorphism as a pull-back displacement field ``(3, X, Y, Z)`` in voxels.

    A stationary velocity field (Gaussian-smoothed white noise on a coarse grid, scaled so its largest vector is
    ``max_displacement_mm``) is exponentiated by scaling and squaring, then upsampled linearly to ``shape``.
    """
    extent = np.array(shape) * np.array(spacing)
    coarse = tuple(int(max(4, math.ceil(e / coarse_mm))) for e in extent)
    velocity = np.stack(
        [
            ndimage.gaussian_filter(rng.standard_normal(coarse), smoothness_mm / coarse_mm, mode="nearest")
            for _ in range(3)
        ]
    ).astype(np.float64)
    norm = np.sqrt((velocity**2).sum(axis=0)).max()
    velocity *= (max_displacement_mm / coarse_mm) / max(norm, 1e-12)  # in coarse voxels
    disp = velocity / (2**squarings)
    grid = np.indices(coarse, dtype=np.float64)
    for _ in range(squarings):
        coords = grid + disp
        disp = disp + np.stack([ndimage.map_coordinates(disp[c], coords, order=1, mode="nearest") for c in range(3)])
    full = []
    for c in range(3):
        up = ndimage.zoom(disp[c], [n / m for n, m in zip(shape, coarse, strict=True)], order=1, grid_mode=False)
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
    coarse = tuple(max(4, int(math.ceil(n * s / 8.0))) for n, s in zip(shape, spacing, strict=True))
    f = ndimage.gaussian_filter(rng.standard_normal(coarse), smoothness_mm / 8.0, mode="nearest")
    f = ndimage.zoom(f, [n / m for n, m in zip(shape, coarse, strict=True)], order=1, grid_mode=False)
    f -= f.mean()
    return (f * (amplitude / max(np.abs(f).max(), 1e-12))).astype(np.float32)


def rigid_matrix(
    angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float], centre_mm: np.ndarray
) -> np.ndarray:
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


def radial_expansion(shape, spacing, centre_vox, amount: float, sigma_mm: float) -> np.ndarray:
    """Pull-back displacement (voxels) that stretches a Gaussian neighbourhood of ``centre_vox`` by ``amount``.

    ``u(x) = −a (x − c) exp(−|x − c|² / 2σ²)``: the volume at ``x`` is read from nearer the centre, so what
    lies there grows; its Jacobian at the centre is ``(1 − a)³`` and stays positive for ``a < 1``.
    """
    sp = np.asarray(spacing, np.float32)[:, None, None, None]
    offset = (np.indices(shape, dtype=np.float32) - np.asarray(centre_vox, np.float32)[:, None, None, None]) * sp
    g = np.exp(-0.5 * (offset**2).sum(axis=0) / sigma_mm**2)
    return (-amount * offset * g / sp).astype(np.float32)


def compose(first: np.ndarray, then: np.ndarray) -> np.ndarray:
    """Pull-back displacement of ``x → φ_first(φ_then(x))``: warp by ``first`` in template space, then by
    ``then``."""
    coords = np.indices(then.shape[1:], dtype=np.float32) + then
    return (
        then + np.stack([ndimage.map_coordinates(first[c], coords, order=1, mode="nearest") for c in range(3)])
    ).astype(np.float32)
