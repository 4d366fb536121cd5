"""The papers' evaluation protocol (paper_protocol.py) against torchmetrics called directly and hand-built masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from m2diff_monai.evaluation import paper_protocol as P
from m2diff_monai.evaluation.lpips_metric import LPIPSMetric

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # set and restored (tests/conftest.py)


def centred_pad(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Written out independently: (size − n) // 2 zeros before, the rest after."""
    out = np.zeros((size, size), dtype=image.dtype)
    top, left = (size - image.shape[0]) // 2, (size - image.shape[1]) // 2
    out[top : top + image.shape[0], left : left + image.shape[1]] = image
    return out


@pytest.fixture(scope="module")
def volume():
    """40×36×12 at 2 mm (official mask threshold scales to 250 px). Slices 0 and 11 are empty (constant SD),
    slice 10 holds only a 6×6 blob (36 px < 250: empty mask), slices 1–9 a brain-like ellipse."""
    rng = np.random.default_rng(3)
    g = np.indices((40, 36), dtype=np.float64)
    ellipse = ((g[0] - 20) / 15) ** 2 + ((g[1] - 17) / 13) ** 2 < 1
    sd = np.zeros((40, 36, 12))
    for k in range(1, 10):
        sd[:, :, k] = ndimage.gaussian_filter(ellipse * (3.0 + k + rng.random((40, 36))), 1.0) * 1000
    sd[5:11, 5:11, 10] = 2000.0
    pred = np.clip(sd + 150 * rng.standard_normal(sd.shape), 0, None)
    pred[:, :, 0] = 7.0  # a constant slice of the prediction where the SD is empty: skipped anyway
    return sd.astype(np.float32), pred.astype(np.float32)


def direct_scores(sd: np.ndarray, pred: np.ndarray, scaling: str, min_size: int) -> dict[str, list[float]]:
    """The official loop written out with torchmetrics' module API, one slice at a time."""
    out: dict[str, list[float]] = {"psnr": [], "ssim": [], "nmse": [], "slices": []}
    for k in range(sd.shape[2]):
        s, p = sd[:, :, k].astype(np.float64), pred[:, :, k].astype(np.float64)
        if s.max() == s.min():
            continue
        s_n = (s - s.min()) / (s.max() - s.min())
        if scaling == "reference":
            p_n = (p - s.min()) / (s.max() - s.min())
        else:
            p_n = (p - p.min()) / (p.max() - p.min()) if p.max() > p.min() else np.zeros_like(p)
        s_pad, p_pad = centred_pad(s_n), centred_pad(p_n)
        mask = P.official_brain_mask(s_pad, 0.1, min_size)
        if not mask.any():
            continue
        t = torch.tensor(s_pad * mask, dtype=torch.float32)[None, None]
        q = torch.tensor(p_pad * mask, dtype=torch.float32)[None, None]
        out["psnr"].append(float(PeakSignalNoiseRatio(data_range=float(t.max() - t.min()))(q, t)))
        out["ssim"].append(float(StructuralSimilarityIndexMeasure()(q, t)))
        tm, qm = (s_pad * mask)[mask], (p_pad * mask)[mask]
        out["nmse"].append(float(np.sum((qm - tm) ** 2) / np.sum(tm**2)))
        out["slices"].append(k)
    return out


@pytest.mark.parametrize("scaling", ["reference", "own"])
def test_paper_columns_equal_torchmetrics_called_directly(volume, scaling):
    sd, pred = volume
    ref = P.prepare_reference(sd, (2.0, 2.0, 2.0), P.PaperOptions(scaling=scaling))
    assert ref.min_size == 250
    row, values = P.score_volume(pred, ref)
    expected = direct_scores(sd, pred, scaling, 250)
    assert list(ref.slices) == expected["slices"] == list(range(1, 10))  # 0, 10, 11 skipped
    assert row["paper_slices"] == 9
    np.testing.assert_allclose(values["psnr"], expected["psnr"], rtol=1e-5)
    np.testing.assert_allclose(values["ssim"], expected["ssim"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["nmse"], expected["nmse"], rtol=1e-5)
    assert row["psnr_paper"] == pytest.approx(np.mean(expected["psnr"]), rel=1e-5)
    assert row["ssim_paper"] == pytest.approx(np.mean(expected["ssim"]), rel=1e-5)
    assert row["nmse_paper"] == pytest.approx(np.mean(expected["nmse"]), rel=1e-5)
    assert np.isnan(row["lpips_paper"])


def test_padding_raises_psnr_by_the_pixel_ratio(volume):
    """The zeroed background counts in the mean: PSNR moves by 10·log10(N_a/N_b) between two paddings, exactly
    where the data range and the errors are the same."""
    sd, pred = volume
    a = P.prepare_reference(sd, (2.0, 2.0, 2.0), P.PaperOptions(pad_to=256))
    b = P.prepare_reference(sd, (2.0, 2.0, 2.0), P.PaperOptions(pad_to=128))
    assert list(a.slices) == list(b.slices)
    assert (a.masks.sum(axis=(1, 2)) == b.masks.sum(axis=(1, 2))).all()
    psnr_a = P.score_volume(pred, a)[1]["psnr"]
    psnr_b = P.score_volume(pred, b)[1]["psnr"]
    np.testing.assert_allclose(psnr_a - psnr_b, 10 * np.log10(256**2 / 128**2), atol=1e-4)


def test_identical_prediction_is_perfect_and_scale_errors_show_only_with_reference_scaling(volume):
    sd, _ = volume
    ref = P.prepare_reference(sd, (2.0, 2.0, 2.0))
    row = P.score_volume(sd, ref)[0]
    assert row["psnr_paper"] == float("inf") and row["nmse_paper"] == 0 and row["ssim_paper"] == pytest.approx(1)
    assert P.score_volume(1.2 * sd, ref)[0]["nmse_paper"] == pytest.approx(0.04, rel=1e-4)
    own = P.prepare_reference(sd, (2.0, 2.0, 2.0), P.PaperOptions(scaling="own"))
    assert P.score_volume(1.2 * sd, own)[0]["nmse_paper"] == pytest.approx(0, abs=1e-10)


def test_official_mask_rule_on_a_synthetic_slice():
    image = np.zeros((256, 256))
    image[40:160, 40:160] = 1.0  # the brain (14400 px)
    image[50:55, 50:55] = 0.0  # a 25 px hole: filled
    image[100:135, 100:135] = 0.0  # a 1225 px hole: kept (≥ 1000)
    image[35:40, 40:160] = 0.1  # exactly the threshold: not > 0.1, left out
    image[40:160, 35:40] = 0.11  # above it: part of the brain
    image[200:210, 20:40] = 1.0  # a 200 px object: removed
    image[200:230, 100:140] = 1.0  # a 1200 px object: survives the size rule, not the largest component
    image[160:180, 160:180] = 1.0  # 400 px touching the brain only at a corner: a separate 4-connected object
    expected = np.zeros_like(image, dtype=bool)
    expected[40:160, 35:160] = True
    expected[100:135, 100:135] = False
    for scale, offset in ((1.0, 0.0), (1000.0, 5.0)):  # min–max scaling: units do not matter
        mask = P.official_brain_mask(image * scale + offset, threshold=0.1, min_size=1000)
        assert mask.dtype == bool
        np.testing.assert_array_equal(mask, expected)


def test_largest_component_is_8_connected_and_empty_cases():
    image = np.zeros((64, 64))
    image[5:25, 5:25] = 1.0  # 400 px
    image[25:45, 25:45] = 1.0  # 400 px, diagonal neighbour of the first
    image[50:60, 50:62] = 1.0  # 120 px, separate
    mask = P.official_brain_mask(image, min_size=100)
    assert mask.sum() == 800 and not mask[55, 55]
    assert not P.official_brain_mask(image, min_size=500).any()  # every object below the size: empty
    assert not P.official_brain_mask(np.full((64, 64), 3.0)).any()  # constant slice


def test_min_size_scaling_and_padding_helpers():
    assert P.scaled_min_size(1.0) == 1000 and P.scaled_min_size(1.04**2) == 1000
    assert P.scaled_min_size(4.0) == 250 and P.scaled_min_size(16.0) == 62 and P.scaled_min_size(1.5**2) == 444
    image = np.arange(64 * 61, dtype=np.float32).reshape(64, 61)
    padded = P.pad_slice(image, 256)
    assert padded.shape == (256, 256)
    np.testing.assert_array_equal(padded, centred_pad(image))
    assert P.pad_slice(np.ones((300, 100)), 256).shape == (300, 256)  # wider than 256: that axis unpadded
    assert P.pad_slice(image, 0) is image
    with pytest.raises(ValueError, match="scaling"):
        P.PaperOptions(scaling="volume")


def test_ssim_crop_equals_the_whole_slice_call():
    """The bounding-box speed-up gives torchmetrics' whole-slice number, also with content near the border."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    rng = np.random.default_rng(0)
    for rows, cols in ((slice(100, 150), slice(90, 170)), (slice(0, 40), slice(3, 60)), (slice(2, 250), slice(1, 255))):
        t = np.zeros((256, 256), np.float32)
        t[rows, cols] = rng.random((rows.stop - rows.start, cols.stop - cols.start))
        p = np.where(t > 0, t + 0.1 * rng.standard_normal(t.shape), 0).astype(np.float32)
        tt, pt = torch.from_numpy(t)[None, None], torch.from_numpy(p)[None, None]
        assert P.ssim_padded(pt, tt) == pytest.approx(float(structural_similarity_index_measure(pt, tt)), abs=2e-6)


def test_lpips_paper_feeds_masked_one_channel_slices_as_the_official_call():
    metric = LPIPSMetric(_allow_random_backbone=True)
    rng = np.random.default_rng(1)
    g = np.indices((48, 48), dtype=np.float64)
    disk = (g[0] - 24) ** 2 + (g[1] - 24) ** 2 < 18**2
    sd = np.stack([disk * (1 + rng.random((48, 48))) for _ in range(2)], axis=2).astype(np.float32)
    pred = (sd + 0.2 * rng.standard_normal(sd.shape)).astype(np.float32)
    ref = P.prepare_reference(sd, (1.0, 1.0, 1.0), P.PaperOptions(min_size=100))
    assert len(ref.slices) == 2
    ours = P.lpips_volume(pred, ref, metric.model)
    direct = []
    for i in range(2):
        t = torch.from_numpy(ref.targets[i])[None, None]  # masked, padded SD slice (1, 1, 256, 256)
        q = torch.from_numpy(P.method_slices(pred, ref)[i])[None, None]
        with torch.inference_mode():
            direct.append(float(metric.model(q, t).mean()))  # one channel: lpips broadcasts it to RGB
    assert ours == pytest.approx(np.mean(direct), rel=1e-5)
    assert P.lpips_volume(sd, ref, metric.model) == pytest.approx(0.0, abs=1e-6)
