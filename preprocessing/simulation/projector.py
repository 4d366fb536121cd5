"""A 2D parallel-beam line-integral projector (Joseph's method) stored as a sparse matrix.

Why we wrote it: no installable PET projector works on these machines (parallelproj is not on PyPI, so
pytomography's PET path cannot run; ASTRA needs CUDA libraries and crashes in 3D on CPU) and scikit-image's
``radon``/``iradon`` is slow and not an exact adjoint pair, which an EM reconstruction needs. A Joseph projector
is a few dozen lines of vectorized numpy: built once per geometry as a :mod:`scipy.sparse` matrix ``A`` (rows:
sinogram bins, columns: pixels), its adjoint is exactly ``A.T``, and all axial planes are projected at once as
one sparse × dense product ``A @ X`` with ``X`` of shape ``(pixels, planes)``.

Conventions: a plane is a canonical ``[x, y]`` array (x = left→right, y = posterior→anterior) flattened in C order,
so a canonical volume ``vol[x, y, z]`` reshaped to ``(nx * ny, nz)`` is exactly the dense right-hand side. The
sinogram is angle-major: row ``angle * n_bins + bin``. Matrix entries are path lengths in millimetres, so
``exp(-A @ mu)`` with ``mu`` in 1/mm gives attenuation factors.

Matrices are cached in memory (:func:`functools.lru_cache`) and, optionally, on disk (``$M2DIFF_CACHE_DIR`` or
``~/.cache/m2diff-monai/projectors``), written atomically so that parallel workers never read half a file.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from m2diff_monai.io.atomic import atomic_path

CACHE_ENV = "M2DIFF_CACHE_DIR"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Geometry:
    """One 2D parallel-beam geometry: image grid, angles over [0, π), detector bins centred on the image centre."""

    nx: int
    ny: int
    dx: float
    dy: float
    n_angles: int
    n_bins: int
    bin_mm: float

    @property
    def n_pixels(self) -> int:
        return self.nx * self.ny

    @property
    def n_rows(self) -> int:
        return self.n_angles * self.n_bins

    def angles(self) -> np.ndarray:
        return np.arange(self.n_angles, dtype=np.float64) * (math.pi / self.n_angles)

    def bin_centres(self) -> np.ndarray:
        return (np.arange(self.n_bins, dtype=np.float64) - (self.n_bins - 1) / 2.0) * self.bin_mm

    def key(self) -> str:
        text = (
            f"v{_FORMAT_VERSION}:{self.nx}:{self.ny}:{self.dx:.6f}:{self.dy:.6f}:"
            f"{self.n_angles}:{self.n_bins}:{self.bin_mm:.6f}"
        )
        return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_geometry(
    nx: int,
    ny: int,
    dx: float,
    dy: float,
    n_angles: int | None = None,
    bin_mm: float | None = None,
    angle_multiple: int = 1,
) -> Geometry:
    """Geometry covering the whole image: bins of one pixel (the smaller side) spanning the image diagonal.

    Default angles: about ``π/2 × (FOV diameter / bin)``, the usual sampling for parallel-beam tomography,
    rounded up to a multiple of ``angle_multiple`` (the number of OSEM subsets, so every subset has as many angles).
    """
    bin_mm = float(bin_mm or min(dx, dy))
    diagonal = math.hypot(nx * dx, ny * dy)
    n_bins = int(math.ceil(diagonal / bin_mm)) + 1
    if n_angles is None:
        wanted = int(math.ceil(0.5 * math.pi * 0.5 * diagonal / bin_mm))
        n_angles = max(angle_multiple, int(math.ceil(wanted / angle_multiple)) * angle_multiple)
    return Geometry(int(nx), int(ny), float(dx), float(dy), int(n_angles), n_bins, bin_mm)


def _joseph_walk(
    s: np.ndarray,
    step_centres: np.ndarray,
    step_mm: float,
    n_interp: int,
    interp_mm: float,
    along: float,
    across: float,
):
    """One angle's rays ``{p : p·n = s}`` walked over the pixel centres ``step_centres`` of the stepped axis; each
    crossing interpolates linearly between the two nearest pixels of the other axis (``n_interp`` pixels of
    ``interp_mm``). ``along``/``across``: the normal's components on the interpolated/stepped axis. Yields, per
    neighbour, (bin index, interpolated-axis index, stepped-axis index, length in mm) of the kept entries."""
    step_len = step_mm / abs(along)
    f = ((s[:, None] - step_centres[None, :] * across) / along) / interp_mm + (n_interp - 1) / 2.0
    lo = np.floor(f)
    w = f - lo
    lo = lo.astype(np.int64)
    other = np.broadcast_to(np.arange(len(step_centres))[None, :], f.shape)
    for idx, weight in ((lo, 1.0 - w), (lo + 1, w)):
        ok = (idx >= 0) & (idx < n_interp) & (weight > 1e-9)
        yield np.nonzero(ok)[0], idx[ok], other[ok], weight[ok] * step_len


def build_joseph_matrix(geom: Geometry) -> sp.csr_matrix:
    """The system matrix: entry (angle·n_bins + bin, x·ny + y) = length (mm) of that ray attributed to that pixel.

    Joseph (1982): walk the ray along the image axis it is most aligned with; at each row (or column) the ray
    crosses, linearly interpolate between the two nearest pixel centres, weighted by the path length per step.
    """
    rows_all, cols_all, vals_all = [], [], []
    s = geom.bin_centres()
    xc = (np.arange(geom.nx) - (geom.nx - 1) / 2.0) * geom.dx
    yc = (np.arange(geom.ny) - (geom.ny - 1) / 2.0) * geom.dy
    for a, theta in enumerate(geom.angles()):
        c, sn = math.cos(theta), math.sin(theta)
        # ray: {p : p·(c, sn) = s}, direction (-sn, c)
        if abs(c) >= abs(sn):  # mostly along y: step over rows y_j, interpolate in x
            entries = [(b, x * geom.ny + y, v) for b, x, y, v in _joseph_walk(s, yc, geom.dy, geom.nx, geom.dx, c, sn)]
        else:  # mostly along x: step over columns x_i, interpolate in y
            entries = [(b, x * geom.ny + y, v) for b, y, x, v in _joseph_walk(s, xc, geom.dx, geom.ny, geom.dy, sn, c)]
        for b_idx, col, val in entries:
            rows_all.append(a * geom.n_bins + b_idx)
            cols_all.append(col)
            vals_all.append(val)
    rows = np.concatenate(rows_all).astype(np.int32)
    cols = np.concatenate(cols_all).astype(np.int32)
    vals = np.concatenate(vals_all).astype(np.float32)
    matrix = sp.csr_matrix((vals, (rows, cols)), shape=(geom.n_rows, geom.n_pixels), dtype=np.float32)
    matrix.sum_duplicates()
    return matrix


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "m2diff-monai" / "projectors")


def _load_or_build(geom: Geometry, use_disk: bool) -> sp.csr_matrix:
    if not use_disk:
        return build_joseph_matrix(geom)
    path = cache_dir() / f"joseph_{geom.key()}.npz"
    if path.exists():
        try:
            matrix = sp.load_npz(path).tocsr()
            if matrix.shape == (geom.n_rows, geom.n_pixels):
                return matrix
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: rebuild and overwrite it
    matrix = build_joseph_matrix(geom)
    try:
        with atomic_path(path) as tmp:
            sp.save_npz(tmp, matrix, compressed=False)
    except OSError:
        pass  # a read-only or full cache folder only costs the rebuild next time
    return matrix


@lru_cache(maxsize=4)
def joseph_matrix(geom: Geometry, disk_cache: bool = True) -> sp.csr_matrix:
    """The cached system matrix for ``geom`` (built on first use; shared, treat it as read-only)."""
    return _load_or_build(geom, disk_cache)


@dataclass(frozen=True)
class SubsetOperators:
    """Per-OSEM-subset row blocks of ``A`` and their transposes, both CSR for fast sparse × dense products.

    Subset ``k`` holds angles ``k, k + S, k + 2S, ...`` (interleaved, so every subset sees the whole object).
    """

    geometry: Geometry
    n_subsets: int
    angle_index: tuple[np.ndarray, ...]
    forward: tuple[sp.csr_matrix, ...]
    adjoint: tuple[sp.csr_matrix, ...]

    def rows(self, k: int) -> np.ndarray:
        nb = self.geometry.n_bins
        return (self.angle_index[k][:, None] * nb + np.arange(nb)[None, :]).ravel()


@lru_cache(maxsize=4)
def subset_operators(geom: Geometry, n_subsets: int, disk_cache: bool = True) -> SubsetOperators:
    if n_subsets < 1 or n_subsets > geom.n_angles:
        raise ValueError(f"subsets must be between 1 and the number of angles ({geom.n_angles}), got {n_subsets}")
    full = joseph_matrix(geom, disk_cache)
    angle_index, fwd, adj = [], [], []
    for k in range(n_subsets):
        angles = np.arange(k, geom.n_angles, n_subsets)
        rows = (angles[:, None] * geom.n_bins + np.arange(geom.n_bins)[None, :]).ravel()
        block = full[rows]
        angle_index.append(angles)
        fwd.append(block.tocsr())
        adj.append(block.T.tocsr())
    return SubsetOperators(geom, n_subsets, tuple(angle_index), tuple(fwd), tuple(adj))
