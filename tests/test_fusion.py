"""Three-orientation fusion: the stripe filter removes inter-slice stripes and leaves smooth anatomy alone."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from m2diff_monai.data.orientation import ORIENTATION_AXIS
from m2diff_monai.inference.fusion import (
    FUSION_METHODS,
    describe_fusion,
    filter_orientation_volume,
    fuse_volumes,
    stripe_filter_slice,
    stripe_plan,
)

SHAPE = (47, 52, 45)  # odd and non-power-of-two sizes: padding and cropping must be exact
WAVELET = "db8"  # 16 taps: 2 DWT levels at the padded 64², so the small test volumes are really filtered


def smooth_volume(shape=SHAPE) -> np.ndarray:
    """A blurred ellipsoid with a gentle modulation: brain-like, non-negative, zero at the borders."""
    g = np.indices(shape).astype(np.float32)
    r2 = sum(((g[i] - (shape[i] - 1) / 2) / (0.4 * shape[i])) ** 2 for i in range(3))
    return (gaussian_filter((r2 < 1).astype(np.float32), 2.5) * (1 + 0.2 * np.cos(g[0] / 4))).astype(np.float32)


def add_stripes(volume: np.ndarray, stacking_axis: int, amplitude: float = 0.05, seed: int = 0) -> np.ndarray:
    """A per-slice random offset along the stacking axis, inside the object: what a 2D model's errors look like."""
    shape = [1, 1, 1]
    shape[stacking_axis] = volume.shape[stacking_axis]
    offsets = amplitude * np.random.default_rng(seed).standard_normal(volume.shape[stacking_axis])
    return (volume + offsets.reshape(shape).astype(np.float32) * (volume > 0.02)).astype(np.float32)


def stripe_energy(volume: np.ndarray, stacking_axis: int) -> float:
    """Variance of the high-passed slice means along the stacking axis."""
    other = tuple(i for i in range(3) if i != stacking_axis)
    means = volume.mean(axis=other).astype(np.float64)
    return float(np.var(means - gaussian_filter1d(means, 2)))


@pytest.mark.parametrize("orientation", list(ORIENTATION_AXIS))
def test_stripes_are_reduced_and_smooth_volume_kept(orientation):
    axis = ORIENTATION_AXIS[orientation]
    clean = smooth_volume()
    striped = add_stripes(clean, axis)
    filtered = filter_orientation_volume(striped, axis, wavelet=WAVELET)
    assert filtered.shape == clean.shape and filtered.dtype == np.float32
    assert stripe_energy(filtered, axis) < 0.25 * stripe_energy(striped, axis)
    # closer to the truth; the low-frequency part of the stripes sits in the (untouched) approximation
    assert np.linalg.norm(filtered - clean) < 0.75 * np.linalg.norm(striped - clean)
    untouched = filter_orientation_volume(clean, axis, wavelet=WAVELET)
    assert np.linalg.norm(untouched - clean) / np.linalg.norm(clean) < 0.02


def test_filter_targets_vertical_stripes_only():
    """Convention check: stripes constant down the rows (vertical) go, horizontal ones stay."""
    rng = np.random.default_rng(1)
    base = gaussian_filter(rng.random((60, 70)), 6).astype(np.float32)
    columns = 0.1 * rng.standard_normal(70).astype(np.float32)
    vertical = base + columns[None, :]
    horizontal = base + columns[:60, None]
    out_v = stripe_filter_slice(vertical, wavelet=WAVELET)
    out_h = stripe_filter_slice(horizontal, wavelet=WAVELET)
    assert out_v.shape == (60, 70)
    assert np.linalg.norm(out_v - base) < 0.6 * np.linalg.norm(vertical - base)
    assert np.linalg.norm(out_h - horizontal) < 0.01 * np.linalg.norm(horizontal - base)


def test_batched_planes_match_single_plane_loop_and_threads():
    """Axial volume (stacking axis 2) is filtered on coronal planes (x, z): vectorised == one plane at a time."""
    vol = add_stripes(smooth_volume(), 2)
    batched = filter_orientation_volume(vol, 2, wavelet=WAVELET, chunk=7)
    looped = np.stack([stripe_filter_slice(vol[:, j, :], wavelet=WAVELET) for j in range(vol.shape[1])], axis=1)
    np.testing.assert_allclose(batched, looped, atol=1e-5)
    threaded = filter_orientation_volume(vol, 2, wavelet=WAVELET, chunk=5, workers=2)
    np.testing.assert_allclose(threaded, batched, atol=1e-6)


def test_slices_without_stripes_are_rejected():
    with pytest.raises(ValueError, match="contain no stripes"):
        filter_orientation_volume(smooth_volume(), 2, slice_axis=2)


def test_default_recipe_reduces_stripes_at_128():
    """db25, sigma 8, levels capped by pywt (1 level at 128²): a thin slab of coronal planes of an axial volume."""
    g = np.indices((128, 6, 128)).astype(np.float32)
    r2 = ((g[0] - 63.5) / 50) ** 2 + ((g[2] - 63.5) / 55) ** 2 + ((g[1] - 2.5) / 20) ** 2
    slab = gaussian_filter((r2 < 1).astype(np.float32), (3, 0, 3)) * (1 + 0.2 * np.cos(g[0] / 6))
    striped = add_stripes(slab, 2, seed=3)
    filtered = filter_orientation_volume(striped, 2)
    assert stripe_energy(filtered, 2) < 0.6 * stripe_energy(striped, 2)
    assert np.linalg.norm(filter_orientation_volume(slab, 2) - slab) / np.linalg.norm(slab) < 0.03


def test_too_small_for_wavelet_warns_and_leaves_image_without_fallback():
    img = np.random.default_rng(0).random((20, 20)).astype(np.float32)
    with pytest.warns(UserWarning, match="left unfiltered"):
        out = stripe_filter_slice(img, fallback_wavelets=())  # db25 needs ~100 samples per level
    np.testing.assert_allclose(out, img, atol=1e-6)


def test_stripe_plan_picks_a_shorter_wavelet_only_when_db25_allows_no_level():
    assert stripe_plan((256, 256)) == ("db25", 2) and stripe_plan((100, 128)) == ("db25", 1)
    assert stripe_plan((64, 64)) == ("db8", 2) and stripe_plan((20, 20)) == ("db8", 1)
    assert stripe_plan((16, 16)) == ("db4", 1) and stripe_plan((8, 8)) == ("haar", 3)
    assert stripe_plan((64, 64), fallback_wavelets=()) == ("db25", 0)
    assert describe_fusion("wavelet-stripe", (64, 64, 64)) == "wavelet-stripe (db8, 2 levels)"
    assert describe_fusion("wavelet-stripe", (128, 128, 128)) == "wavelet-stripe (db25, 1 level)"
    assert describe_fusion("mean", (64, 64, 64)) == "mean"


@pytest.mark.parametrize("orientation", list(ORIENTATION_AXIS))
def test_default_recipe_filters_the_64_cube_demo(orientation):
    """The demo's 64³ grid: db25 allows no level there, so the default now runs db8 — stripes cut, anatomy kept."""
    axis = ORIENTATION_AXIS[orientation]
    clean = smooth_volume((64, 64, 64))
    striped = add_stripes(clean, axis, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "left unfiltered" warning any more
        filtered = filter_orientation_volume(striped, axis)
        untouched = filter_orientation_volume(clean, axis)
    assert stripe_energy(filtered, axis) < 0.25 * stripe_energy(striped, axis)
    assert np.linalg.norm(filtered - clean) < 0.75 * np.linalg.norm(striped - clean)
    assert np.linalg.norm(untouched - clean) / np.linalg.norm(clean) < 0.02


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_identical_volumes_fuse_to_themselves(method):
    vol = smooth_volume()
    vols = {name: vol.copy() for name in ORIENTATION_AXIS}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fuse_volumes(vols, method=method, wavelet=WAVELET)
    assert fused.shape == vol.shape and fused.dtype == np.float32
    assert np.linalg.norm(fused - vol) / np.linalg.norm(vol) < 0.02


@pytest.mark.parametrize("method", FUSION_METHODS)
def test_output_non_negative_and_partial_orientations(method):
    rng = np.random.default_rng(2)
    vol = smooth_volume() + 0.05 * rng.standard_normal(SHAPE).astype(np.float32)
    assert vol.min() < 0
    for names in (("axial",), ("coronal", "sagittal"), tuple(ORIENTATION_AXIS)):
        fused = fuse_volumes({n: vol for n in names}, method=method, wavelet=WAVELET)
        assert fused.shape == SHAPE and fused.dtype == np.float32
        assert fused.min() >= 0.0


def test_fusion_averages_three_different_stripe_patterns():
    """Each orientation has its own stripes; the fused volume is closer to the truth than their plain mean."""
    clean = smooth_volume()
    vols = {name: add_stripes(clean, axis, seed=10 + axis) for name, axis in ORIENTATION_AXIS.items()}
    plain = fuse_volumes(vols, method="mean")
    filtered = fuse_volumes(vols, method="wavelet-stripe", wavelet=WAVELET)
    np.testing.assert_allclose(plain, np.maximum(np.mean(list(vols.values()), axis=0), 0), atol=1e-6)
    assert np.linalg.norm(filtered - clean) < 0.7 * np.linalg.norm(plain - clean)


def test_residual_stripe_filter_removes_stripes_like_lowgan_and_keeps_a_hot_spot():
    """``wavelet-stripe-residual`` filters each orientation's difference from the others: the stripes go as with
    ``wavelet-stripe`` (the filter is linear), a hot spot present in every orientation is not damped."""
    clean = smooth_volume()
    clean[20:22, 25:27, 22:24] += 2.0  # a 2×2×2-voxel lesion at ~3× the background
    lesion = (slice(20, 22), slice(25, 27), slice(22, 24))
    vols = {name: add_stripes(clean, axis, amplitude=0.1, seed=10 + axis) for name, axis in ORIENTATION_AXIS.items()}
    plain = fuse_volumes(vols, method="mean")
    lowgan = fuse_volumes(vols, method="wavelet-stripe", wavelet=WAVELET)
    residual = fuse_volumes(vols, method="wavelet-stripe-residual", wavelet=WAVELET)
    for axis in range(3):
        assert stripe_energy(residual, axis) < 0.5 * stripe_energy(plain, axis)
        assert stripe_energy(residual, axis) < 1.05 * stripe_energy(lowgan, axis)
    assert np.linalg.norm(residual - clean) < 0.7 * np.linalg.norm(plain - clean)
    recovered = residual[lesion].mean() / clean[lesion].mean()
    assert abs(recovered - plain[lesion].mean() / clean[lesion].mean()) < 0.002  # as the plain mean: undamped
    assert lowgan[lesion].mean() / clean[lesion].mean() < recovered - 0.05  # LowGAN's filter damps it


def test_bad_inputs():
    vol = smooth_volume()
    with pytest.raises(ValueError, match="unknown orientation"):
        fuse_volumes({"oblique": vol})
    with pytest.raises(ValueError, match="share one shape"):
        fuse_volumes({"axial": vol, "coronal": vol[:-1]})
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse_volumes({"axial": vol}, method="median")
    with pytest.raises(ValueError, match="at least one"):
        fuse_volumes({})


def _literal_munch(image: np.ndarray, levels: int, wavelet: str, sigma: float) -> np.ndarray:
    """The textbook algorithm, one image, zero padding, explicit fftshift — an independent reference."""
    import pywt

    h, w = image.shape
    ph, pw = (2 ** int(np.ceil(np.log2(n))) for n in (h, w))
    padded = np.pad(image.astype(np.float64), ((0, ph - h), (0, pw - w)))
    details = []
    for _ in range(levels):
        padded, (c_h, c_v, c_d) = pywt.dwt2(padded, wavelet)
        spectrum = np.fft.fftshift(np.fft.fft(c_v, axis=0), axes=0)
        k = np.fft.fftshift(np.fft.fftfreq(c_v.shape[0]) * c_v.shape[0])
        spectrum *= (1 - np.exp(-(k**2) / (2 * sigma**2)))[:, None]
        details.append((c_h, np.real(np.fft.ifft(np.fft.ifftshift(spectrum, axes=0), axis=0)), c_d))
    for c_h, c_v, c_d in reversed(details):
        padded = pywt.idwt2((padded[: c_h.shape[0], : c_h.shape[1]], (c_h, c_v, c_d)), wavelet)
    return padded[:h, :w]


@pytest.mark.parametrize("levels,cap", [(3, False), (8, True)])
def test_matches_literal_reference(levels, cap):
    img = np.random.default_rng(5).random((100, 75))
    ours = stripe_filter_slice(img, wavelet="db4", levels=levels, sigma=4.0, cap_levels=cap, pad_mode="constant")
    expected_levels = min(levels, 4) if cap else levels  # pywt.dwt_max_level(128, 8) == 4
    np.testing.assert_allclose(ours, _literal_munch(img, expected_levels, "db4", 4.0), atol=1e-10)
