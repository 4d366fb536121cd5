"""Metrics against independent references (scikit-image, closed forms), LPIPS without downloads, figure panels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from m2diff_monai.evaluation import metrics as M
from m2diff_monai.evaluation.lpips_metric import WEIGHTS_ENV_VAR, LPIPSMetric, find_alexnet_weights


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    target = gaussian_filter(rng.random((36, 40, 30)), 2).astype(np.float32)
    target = (target - target.min()) / (target.max() - target.min())
    pred = (target + 0.05 * rng.standard_normal(target.shape)).astype(np.float32)
    mask = np.zeros(target.shape, dtype=bool)
    mask[6:30, 5:33, 4:26] = True
    return pred, target, mask


@pytest.mark.parametrize("gaussian", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ssim_matches_skimage_2d_and_3d(pair, gaussian, dtype):
    pred, target, _ = (a.astype(dtype) for a in pair)
    ours = M.ssim(pred, target, data_range=1.0, gaussian_weights=gaussian)
    ref = sk_ssim(pred, target, data_range=1.0, gaussian_weights=gaussian)
    assert ours == pytest.approx(ref, abs=1e-6)
    ours2d = M.ssim(pred[:, :, 3], target[:, :, 3], data_range=1.0, gaussian_weights=gaussian)
    ref2d = sk_ssim(pred[:, :, 3], target[:, :, 3], data_range=1.0, gaussian_weights=gaussian)
    assert ours2d == pytest.approx(ref2d, abs=1e-6)
    per_slice = M.ssim(pred, target, data_range=1.0, slice_axis=1, gaussian_weights=gaussian)
    ref_slices = [sk_ssim(pred[:, j], target[:, j], data_range=1.0, gaussian_weights=gaussian) for j in range(40)]
    assert per_slice == pytest.approx(np.mean(ref_slices), abs=1e-6)


def test_masked_ssim_is_the_map_mean_inside_the_mask(pair):
    pred, target, mask = pair
    _, smap = sk_ssim(pred, target, data_range=0.8, full=True)
    interior = np.zeros_like(mask)
    interior[3:-3, 3:-3, 3:-3] = True
    expected = smap[mask & interior].mean()
    assert M.ssim(pred, target, mask, data_range=0.8) == pytest.approx(expected, abs=1e-6)
    everything = np.ones_like(mask)
    assert M.ssim(pred, target, everything, data_range=0.8) == pytest.approx(
        sk_ssim(pred, target, data_range=0.8), abs=1e-6
    )
    # per-slice masked SSIM, against skimage's 2D map slice by slice
    values = M.per_slice_metrics(pred, target, mask, 0.8, 2, metrics=("ssim",))["ssim"]
    for k in (3, 4, 10, 25, 26):
        _, smap2 = sk_ssim(pred[:, :, k], target[:, :, k], data_range=0.8, full=True)
        inner2 = np.zeros(smap2.shape, bool)
        inner2[3:-3, 3:-3] = True
        region = mask[:, :, k] & inner2
        if region.any():
            assert values[k] == pytest.approx(smap2[region].mean(), abs=1e-6)
        else:
            assert np.isnan(values[k])


def test_psnr_nmse_bias_against_references(pair):
    pred, target, mask = pair
    assert M.psnr(pred, target, data_range=1.0) == pytest.approx(sk_psnr(target, pred, data_range=1.0), abs=1e-5)
    assert M.psnr(pred, target, mask, data_range=0.7) == pytest.approx(
        sk_psnr(target[mask], pred[mask], data_range=0.7), abs=1e-5
    )
    # default data range = the target's peak inside the mask
    assert M.resolve_data_range(target, mask) == pytest.approx(float(target[mask].max()))
    assert M.psnr(pred, target, mask) == pytest.approx(M.psnr(pred, target, mask, float(target[mask].max())))
    p, t = pred[mask].astype(np.float64), target[mask].astype(np.float64)
    assert M.nmse(pred, target, mask) == pytest.approx(np.mean((p - t) ** 2) / np.mean(t**2), rel=1e-6)
    assert M.relative_bias(0.9 * target, target, mask) == pytest.approx(-0.1, abs=1e-6)
    assert M.psnr(target, target, mask) == float("inf")


def test_per_slice_psnr_and_nmse_match_loops(pair):
    pred, target, mask = pair
    out = M.per_slice_metrics(pred, target, mask, 0.9, 0, min_slice_voxels=1)
    for i in range(target.shape[0]):
        m = mask[i]
        if not m.any():
            assert np.isnan(out["psnr"][i]) and np.isnan(out["nmse"][i])
            continue
        assert out["psnr"][i] == pytest.approx(sk_psnr(target[i][m], pred[i][m], data_range=0.9), abs=1e-4)
        assert out["nmse"][i] == pytest.approx(M.nmse(pred[i], target[i], m), rel=1e-5)


def test_brain_mask_like_official():
    vol = np.zeros((40, 40, 40), dtype=np.float32)
    g = np.indices(vol.shape)
    r = np.sqrt(((g - 20) ** 2).sum(axis=0))
    vol[r < 12] = 1.0
    vol[r < 4] = 0.02  # a low-uptake cavity inside the brain: a hole to fill
    vol[2:4, 2:4, 2:4] = 0.9  # a small bright object outside: removed
    vol += 0.03 * np.random.default_rng(0).random(vol.shape).astype(np.float32)  # background below threshold
    mask = M.brain_mask_like_official(vol)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, r < 12)
    small_holes_only = M.brain_mask_like_official(vol, max_hole_size=10)
    assert not small_holes_only[20, 20, 20] and small_holes_only[20, 20, 10]


def test_evaluate_volume(pair):
    pred, target, mask = pair
    regions = {"left": mask & (np.indices(mask.shape)[0] < 18), "empty": np.zeros_like(mask)}
    perfect = M.evaluate_volume(target, target, mask, regions, spacing=(2.0, 2.0, 2.0))
    assert perfect["psnr"] == float("inf") and perfect["ssim"] == pytest.approx(1.0)
    assert perfect["nmse"] == 0.0 and perfect["bias"] == 0.0 and perfect["bias_left"] == 0.0
    assert perfect["psnr_2d_axial"] == float("inf") and perfect["ssim_2d"] == pytest.approx(1.0)
    assert perfect["brain_volume_ml"] == pytest.approx(mask.sum() * 8 / 1000)
    assert np.isnan(perfect["bias_empty"])
    scaled = M.evaluate_volume(0.8 * target, target, mask, regions)
    assert scaled["bias"] == pytest.approx(-0.2, abs=1e-6) and scaled["bias_left"] == pytest.approx(-0.2, abs=1e-6)
    row = M.evaluate_volume(pred, target, mask, min_slice_voxels=1)
    assert row["data_range"] == pytest.approx(float(target[mask].max()))
    assert row["ssim"] == pytest.approx(M.ssim(pred, target, mask), abs=1e-9)
    per_o = [M.ssim(pred, target, mask, slice_axis=a) for a in (2, 1, 0)]
    assert row["ssim_2d"] == pytest.approx(np.mean(per_o), abs=1e-9)
    assert row["ssim_2d_sagittal"] == pytest.approx(per_o[2], abs=1e-9)
    derived = M.evaluate_volume(pred, target, None)
    assert derived["brain_voxels"] == float(M.brain_mask_like_official(target).sum())


def test_bad_metric_inputs(pair):
    pred, target, mask = pair
    with pytest.raises(ValueError, match="shape"):
        M.psnr(pred[:-1], target)
    with pytest.raises(ValueError, match="empty"):
        M.psnr(pred, target, np.zeros_like(mask))
    with pytest.raises(ValueError, match="data range"):
        M.psnr(pred, np.zeros_like(target))


# ---------------------------------------------------------------- LPIPS


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No weights anywhere: an empty torch hub and no environment variable."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    return tmp_path


@pytest.fixture(scope="module")
def alexnet_features_file(tmp_path_factory):
    """A torchvision-format AlexNet state dict with random weights (``features.*``, what LPIPS uses, and a
    classifier layer, which it must ignore); the names are pinned to torchvision's in test_lpips_net.py."""
    import torch

    from m2diff_monai.evaluation.lpips_net import alexnet_features

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in alexnet_features().state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "alexnet-owt-7be5be79.pth"
    torch.save({**state, "classifier.1.weight": torch.zeros(4096, 9216)}, path)
    return path, state


def test_lpips_without_weights_reports_unavailable(offline_hub):
    metric = LPIPSMetric()
    assert metric.available is False
    assert WEIGHTS_ENV_VAR in metric.reason and "\n" not in metric.reason
    assert np.isnan(metric(np.ones((32, 32)), np.ones((32, 32))))
    missing = LPIPSMetric(weights_path=offline_hub / "nope.pth")
    assert not missing.available and "nope.pth does not exist" in missing.reason


def test_lpips_random_backbone_code_path(offline_hub):
    metric = LPIPSMetric(_allow_random_backbone=True, batch_size=3)
    assert metric.available and metric.random_backbone
    rng = np.random.default_rng(0)
    vol = gaussian_filter(rng.random((32, 32, 8)), 1.5).astype(np.float32)
    assert metric(vol, vol) == pytest.approx(0.0, abs=1e-7)
    noisy = vol + 0.2 * rng.standard_normal(vol.shape).astype(np.float32)
    values = metric.slice_values(noisy, vol, data_range=1.0, slice_axis=2)
    assert values.shape == (8,) and np.all(values > 0)
    # batching does not change the values: one slice alone scores the same
    assert metric(noisy[:, :, 5], vol[:, :, 5], data_range=1.0) == pytest.approx(values[5], rel=1e-4)
    mask = np.zeros(vol.shape, bool)
    mask[:, :, 2:4] = True
    masked = metric.slice_values(noisy, vol, mask, data_range=1.0, slice_axis=2)
    assert np.isnan(masked[[0, 1, 4, 5, 6, 7]]).all() and np.allclose(masked[2:4], values[2:4], rtol=1e-4)


def test_lpips_loads_backbone_from_file_and_env(offline_hub, alexnet_features_file, monkeypatch):
    path, state = alexnet_features_file
    metric = LPIPSMetric(weights_path=path)
    assert metric.available and not metric.random_backbone and metric.reason == ""
    loaded = metric.model.features[6].weight
    np.testing.assert_array_equal(loaded.numpy(), state["features.6.weight"].numpy())
    img = np.random.default_rng(1).random((40, 36)).astype(np.float32)
    assert np.isfinite(metric(img, 0.5 * img))
    with pytest.raises(ValueError, match="32"):
        metric(img[:20], img[:20])
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(path))
    assert find_alexnet_weights() == path
    assert find_alexnet_weights(offline_hub / "missing.pth") is None  # an explicit path is never replaced
    corrupt = offline_hub / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    broken = LPIPSMetric(weights_path=corrupt)
    assert not broken.available and broken.reason.startswith("LPIPS unavailable: cannot load")


# ---------------------------------------------------------------- figures


def test_figure_panel_writes_grid(tmp_path, pair):
    from matplotlib.image import imread

    _, target, mask = pair
    rng = np.random.default_rng(3)
    vols = {
        "LD": target + 0.2 * rng.random(target.shape).astype(np.float32),
        "M2Diff": target + 0.05 * rng.random(target.shape).astype(np.float32),
        "IDDPM": target * 0.9,
        "SD": target,
    }
    out = tmp_path / "panel.png"
    from m2diff_monai.evaluation.figures import figure_panel

    assert figure_panel(vols, out, mask=mask) == out
    height, width = imread(out).shape[:2]
    assert width / height == pytest.approx(5 / 3, rel=0.15)  # 4 volumes + 1 error map, 3 orientations
    each = figure_panel(vols, tmp_path / "each.png", orientations=("axial",), error_maps="each", slice_index=10)
    height, width = imread(each).shape[:2]
    assert width / height == pytest.approx(6 / 1, rel=0.25)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file
    with pytest.raises(KeyError, match="reference"):
        figure_panel({"LD": target}, tmp_path / "x.png")
