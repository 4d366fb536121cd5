"""OSEM for a stack of 2D planes, all planes at once, with numpy/scipy or torch (CPU or GPU) arithmetic.

The system model of one subset ``k`` (rows = its sinogram bins, columns = pixels; one column per axial plane) is

    ȳ_k(x) = q · w_k ⊙ B(A_k x) + q · b_k

``A_k`` the Joseph line integrals (:mod:`.projector`), ``B`` the resolution model as a separable Gaussian blur of
the sinogram along detector bins and along planes (for a shift-invariant Gaussian PSF this equals blurring the
image before projecting, but costs a fraction), ``w_k = η · exp(-A_k μ)`` the attenuation times the count scale η,
``b_k`` the expected scatter + randoms, ``q`` the dose fraction (1 for standard dose, 1/DRF for low dose).
The adjoint is ``A_kᵀ B (w_k ⊙ ·)``: ``B`` is a symmetric convolution with zero padding, so it is self-adjoint.
Sensitivity images ``s_k = q · A_kᵀ B w_k`` are computed once per geometry and attenuation, and shared by every
reconstruction of a subject (standard dose, low dose and the noise-free calibration run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .projector import SubsetOperators

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_TRUNCATE = 3.0


def gaussian_kernel1d(sigma: float) -> np.ndarray:
    """The kernel :func:`scipy.ndimage.gaussian_filter1d` uses (truncate 3), so both backends blur identically."""
    radius = int(_TRUNCATE * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


@dataclass(frozen=True)
class SinogramBlur:
    """Separable Gaussian blur of a ``(angles, bins, planes)`` sinogram; sigmas in bins and in planes (0 = none)."""

    sigma_bins: float
    sigma_planes: float

    @property
    def active(self) -> bool:
        return self.sigma_bins > 0 or self.sigma_planes > 0


class NumpyOps:
    """scipy.sparse products (single-threaded, exact float32) and scipy.ndimage blurs."""

    name = "numpy"

    def __init__(self, ops: SubsetOperators, blur: SinogramBlur):
        self.ops, self.blur_spec = ops, blur

    def asarray(self, a: np.ndarray):
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def project(self, k: int, x):
        return self.ops.forward[k] @ x

    def backproject(self, k: int, y):
        return self.ops.adjoint[k] @ y

    def blur(self, y, n_angles: int):
        if not self.blur_spec.active:
            return y
        y3 = y.reshape(n_angles, self.ops.geometry.n_bins, -1)
        if self.blur_spec.sigma_bins > 0:
            y3 = ndimage.correlate1d(y3, gaussian_kernel1d(self.blur_spec.sigma_bins), axis=1, mode="constant")
        if self.blur_spec.sigma_planes > 0 and y3.shape[2] > 1:
            y3 = ndimage.correlate1d(y3, gaussian_kernel1d(self.blur_spec.sigma_planes), axis=2, mode="constant")
        return y3.reshape(y.shape)

    def ratio(self, num, den):
        out = np.zeros_like(den)
        np.divide(num, den, out=out, where=den > 0)
        return out


class TorchOps:
    """torch.sparse CSR products (multi-threaded on CPU, cuSPARSE on GPU) and conv1d blurs."""

    name = "torch"

    def __init__(self, ops: SubsetOperators, blur: SinogramBlur, device: str | None = None):
        import warnings

        import torch

        self.torch = torch
        self.ops, self.blur_spec = ops, blur
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            self.forward = [self._csr(m) for m in ops.forward]
            self.adjoint = [self._csr(m) for m in ops.adjoint]
        self.kernels = {}
        for name, sigma in (("bins", blur.sigma_bins), ("planes", blur.sigma_planes)):
            if sigma > 0:
                self.kernels[name] = torch.from_numpy(gaussian_kernel1d(sigma)).to(self.device).view(1, 1, -1)

    def _csr(self, m):
        t = self.torch
        return t.sparse_csr_tensor(
            t.from_numpy(m.indptr.astype(np.int64)),
            t.from_numpy(m.indices.astype(np.int64)),
            t.from_numpy(m.data.astype(np.float32)),
            size=m.shape,
        ).to(self.device)

    def asarray(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)

    def to_numpy(self, a) -> np.ndarray:
        return a.detach().cpu().numpy()

    def project(self, k: int, x):
        return self.forward[k] @ x

    def backproject(self, k: int, y):
        return self.adjoint[k] @ y

    def _conv_last(self, y, kernel):
        """Zero-padded 1D correlation along the last axis (the kernel is symmetric: also a convolution)."""
        shape = y.shape
        flat = y.reshape(-1, 1, shape[-1])
        pad = kernel.shape[-1] // 2
        return self.torch.nn.functional.conv1d(flat, kernel, padding=pad).reshape(shape)

    def blur(self, y, n_angles: int):
        if not self.blur_spec.active:
            return y
        y3 = y.reshape(n_angles, self.ops.geometry.n_bins, -1)
        if "bins" in self.kernels:
            y3 = self._conv_last(y3.transpose(1, 2).contiguous(), self.kernels["bins"]).transpose(1, 2)
        if "planes" in self.kernels and y3.shape[2] > 1:
            y3 = self._conv_last(y3.contiguous(), self.kernels["planes"])
        return y3.contiguous().reshape(y.shape)

    def ratio(self, num, den):
        t = self.torch
        return t.where(den > 0, num / t.where(den > 0, den, t.ones_like(den)), t.zeros_like(den))


def make_ops(ops: SubsetOperators, blur: SinogramBlur, backend: str = "numpy", device: str | None = None):
    if backend == "numpy":
        return NumpyOps(ops, blur)
    if backend == "torch":
        return TorchOps(ops, blur, device)
    raise ValueError(f"unknown backend {backend!r}; choose numpy or torch")


class SubsetModel:
    """The per-subset data of one subject: weights ``w_k``, background ``b_k``, and sensitivities ``A_kᵀ B w_k``."""

    def __init__(self, arith, weights: np.ndarray, background: np.ndarray):
        """``weights`` and ``background``: full sinograms ``(angles, bins, planes)``, in counts at standard dose."""
        self.arith = arith
        ops = arith.ops
        self.n_angles = [len(a) for a in ops.angle_index]
        self.weights = [arith.asarray(self.split(weights, k)) for k in range(ops.n_subsets)]
        self.background = [arith.asarray(self.split(background, k)) for k in range(ops.n_subsets)]
        self.sensitivity = [
            arith.backproject(k, arith.blur(self.weights[k], self.n_angles[k])) for k in range(ops.n_subsets)
        ]

    def split(self, sino: np.ndarray, k: int) -> np.ndarray:
        """Subset ``k``'s rows of a ``(angles, bins, planes)`` sinogram as a ``(rows, planes)`` matrix."""
        part = sino[self.arith.ops.angle_index[k]]
        return np.ascontiguousarray(part.reshape(-1, sino.shape[-1]), dtype=np.float32)

    def expected(self, k: int, x, dose: float = 1.0):
        a = self.arith
        return dose * (self.weights[k] * a.blur(a.project(k, x), self.n_angles[k]) + self.background[k])

    def adjoint(self, k: int, v):
        a = self.arith
        return a.backproject(k, a.blur(self.weights[k] * v, self.n_angles[k]))


def osem(model: SubsetModel, data: np.ndarray, iterations: int, dose: float = 1.0) -> np.ndarray:
    """OSEM (Hudson & Larkin 1994) with all planes batched; ``data`` is a ``(angles, bins, planes)`` sinogram.

    Starts from a uniform image whose projection matches the data's net counts; returns ``(pixels, planes)``.
    """
    a = model.arith
    ops = a.ops
    y = [a.asarray(model.split(np.asarray(data, dtype=np.float32), k)) for k in range(ops.n_subsets)]
    sens_total = sum(a.to_numpy(s).sum(axis=0) for s in model.sensitivity) * dose
    net = np.clip(
        np.asarray(data, dtype=np.float64).sum(axis=(0, 1))
        - dose * sum(a.to_numpy(b).sum(axis=0) for b in model.background),
        0,
        None,
    )
    level = np.where(sens_total > 0, net / np.maximum(sens_total, 1e-30), 0.0)
    level = np.where(level > 0, level, 1e-3 * max(float(level.max()), 1e-12))
    x = a.asarray(np.broadcast_to(level[None, :], (ops.geometry.n_pixels, len(level))))
    for _ in range(iterations):
        for k in range(ops.n_subsets):
            ybar = model.expected(k, x, dose)
            x = x * a.ratio(model.adjoint(k, a.ratio(y[k], ybar)), model.sensitivity[k])
    return a.to_numpy(x).astype(np.float32, copy=False)


def postfilter(volume: np.ndarray, spacing: tuple[float, float, float], fwhm_mm: float) -> np.ndarray:
    """Isotropic Gaussian post-filter (FWHM in mm) of a canonical volume, zero outside the field of view."""
    if fwhm_mm <= 0:
        return volume
    sigma = [fwhm_mm * FWHM_TO_SIGMA / s for s in spacing]
    return ndimage.gaussian_filter(volume, sigma=sigma, mode="constant", truncate=_TRUNCATE).astype(np.float32)
