"""Low-frequency consistency with the LD PET (inference/consistency.py): the coarse band is the LD's, the fine
band the prediction's; the setting travels like every sampler setting (flag > checkpoint > bundle > off)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from badinputs import write_subject
from m2diff_monai.inference import api
from m2diff_monai.inference.cli import main as infer_main
from m2diff_monai.inference.consistency import FWHM_PER_SIGMA, consistency_sigma, ld_consistency
from m2diff_monai.inference.defaults import check_inference_defaults
from m2diff_monai.networks.factory import build_network, register_network
from tiny_networks import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "m2diff"
CUBE = 32
QUICK = {
    "orientations": "axial",
    "fusion": "mean",
    "batch_size": 64,
    "progress": False,
    "png": False,
    "device": "cpu",
    "steps": 2,
}
SHRINK = 0.9  # the test network's x̂0 = 0.9 × LD: a coarse uptake error the consistency must undo


class ShrinkingNetwork(nn.Module):
    """x̂0 = 0.9 × LD: a network that lowers the uptake everywhere (what a domain shift does to the coarse band)."""

    is_diffusion = True

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = dict(config)

    def forward(self, x_t=None, t=None, ld=None, mri=None, mri_available=None):
        return {"out": SHRINK * ld}


register_network("consistency_test_shrink", ShrinkingNetwork)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sigma_in_voxels_from_a_fwhm_in_mm():
    assert consistency_sigma(None, (4.0, 4.0, 4.0)) is None
    assert consistency_sigma(FWHM_PER_SIGMA * 4.0, (4.0, 4.0, 2.0)) == pytest.approx((1.0, 1.0, 2.0))
    assert pytest.approx(2.3548, abs=1e-4) == FWHM_PER_SIGMA
    with pytest.raises(ValueError, match="voxel size"):
        consistency_sigma(8.0, (4.0, 0.0, 4.0))


def test_the_coarse_band_comes_from_the_ld_and_the_fine_band_from_the_prediction():
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(32.0),) * 3, indexing="ij")
    smooth = 1.0 + 0.5 * np.sin(2 * np.pi * x / 32) * np.cos(2 * np.pi * y / 32)  # far wider than σ = 1
    ld = smooth + 0.05 * rng.standard_normal(smooth.shape)
    checker = 0.2 * (-1.0) ** (x + y + z)  # the finest detail a grid holds
    out = ld_consistency(1.07 * smooth + checker, ld, 1.0)
    interior = (slice(4, -4),) * 3
    # a 7 % error of the coarse uptake is gone (to the LD's noise that passes the filter) ...
    coarse = ld_consistency(1.07 * smooth, ld, 1.0)
    assert np.abs(coarse - smooth)[interior].mean() < 0.01 < np.abs(1.07 * smooth - smooth)[interior].mean()
    # ... while the checkerboard the prediction holds is kept (a Gaussian of σ = 1 passes < 0.1 % of it)
    detail = out - coarse
    assert np.allclose(detail[interior], checker[interior], atol=0.002)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="one grid"):
        ld_consistency(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 1.0)


def test_the_setting_parses_and_is_off_by_default():
    assert api.InferenceSettings().ld_consistency_fwhm is None
    assert api.InferenceSettings(ld_consistency_fwhm="none").ld_consistency_fwhm is None
    assert api.InferenceSettings(ld_consistency_fwhm="9.4").ld_consistency_fwhm == 9.4
    with pytest.raises(ValueError, match="ld_consistency_fwhm"):
        api.InferenceSettings(ld_consistency_fwhm=0)
    assert check_inference_defaults({"ld_consistency_fwhm": 9.4}) == {"ld_consistency_fwhm": 9.4}
    with pytest.raises(ValueError, match="ld_consistency_fwhm"):
        check_inference_defaults({"ld_consistency_fwhm": -1})


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("subject")
    return root / write_subject(root, "s01", seed=5, with_mri=False)["ld_pet"]


def _checkpoint(path: Path, inference_defaults: dict | None) -> Path:
    net = build_network({"name": "consistency_test_shrink"})
    data = {"size": CUBE, "normalization": "shared", "transform": "rigid", "space": "pet"}
    return save_checkpoint(path, net, None, data, inference_defaults)


def _level(pred: Path, ld: Path, sampled: np.ndarray) -> float:
    """Mean prediction over mean LD over the voxels the network sampled: the coarsest band, which the consistency
    takes from the LD (finer bands keep part of the 0.9× error; the phantom's structure is a few voxels wide)."""
    predicted, low_dose = (np.asarray(nib.load(f).dataobj, dtype=np.float64) for f in (pred, ld))
    return float(predicted[sampled].mean() / low_dose[sampled].mean())


def test_the_stored_setting_undoes_a_coarse_uptake_error_end_to_end(tmp_path, subject):
    """NIfTI → preprocessing → the 0.9× network → fusion → native grid: off, the uptake comes back 10 % low; with
    the checkpoint's stored FWHM (no flag), at the LD's level; ``--ld-consistency-fwhm none`` turns it off again."""
    plain = _checkpoint(tmp_path / "plain.pt", None)
    api.infer_subject(plain, subject, tmp_path / "off.nii.gz", bundle=BUNDLE, **QUICK)
    sampled = np.asarray(nib.load(tmp_path / "off.nii.gz").dataobj) > 0  # slices without brain are not sampled
    assert _level(tmp_path / "off.nii.gz", subject, sampled) == pytest.approx(SHRINK, abs=0.01)

    stored = _checkpoint(tmp_path / "stored.pt", {"ld_consistency_fwhm": 12.0})
    summary = api.infer_subject(stored, subject, tmp_path / "on.nii.gz", bundle=BUNDLE, **QUICK)
    assert summary["settings"]["ld_consistency_fwhm"] == 12.0
    assert summary["settings_sources"]["ld_consistency_fwhm"] == "checkpoint"
    assert _level(tmp_path / "on.nii.gz", subject, sampled) == pytest.approx(1.0, abs=0.02)  # edges: measured 0.988

    base = [
        "--bundle",
        str(BUNDLE),
        "--checkpoint",
        str(stored),
        "--ld-pet",
        str(subject),
        "--no-png",
        "--no-progress",
        "--orientations",
        "axial",
        "--fusion",
        "mean",
        "--device",
        "cpu",
        "--steps",
        "2",
    ]
    assert infer_main([*base, "--out", str(tmp_path / "flag_off.nii.gz"), "--ld-consistency-fwhm", "none"]) == 0
    assert _level(tmp_path / "flag_off.nii.gz", subject, sampled) == pytest.approx(SHRINK, abs=0.01)


def test_the_model_card_says_the_consistency_is_on():
    from m2diff_monai.export.model_card import sampler_sentence

    text = sampler_sentence({"sampler": "ddim", "steps": 2, "start_step": None, "ld_consistency_fwhm": 7.0})
    assert "FWHM 7 mm" in text and "pure noise" in text
    assert "FWHM" not in sampler_sentence({"sampler": "ddim", "steps": 2, "start_step": None})


def test_the_exported_bundles_inferer_applies_it_at_the_checkpoints_spacing():
    """The deploy path (an exported bundle's ``PETEnhancementInferer``) converts the FWHM with the checkpoint's
    training spacing and undoes the 0.9× uptake error like ``m2diff-infer`` does."""
    from m2diff_monai.deploy import PETEnhancementInferer

    rng = np.random.default_rng(1)
    ld = torch.from_numpy(1.0 + 0.1 * rng.standard_normal((1, 1, 16, 16, 16)).astype(np.float32))
    data = {"size": 16, "normalization": "shared", "transform": "rigid", "space": "pet", "spacing": [4.0, 4.0, 4.0]}
    network = build_network({"name": "consistency_test_shrink"})
    common = {"orientations": "axial", "fusion": "mean", "steps": 2, "batch_size": 16, "progress": False}
    off = PETEnhancementInferer({"timesteps": 100}, data, **common)(ld, network)
    on = PETEnhancementInferer({"timesteps": 100}, data, ld_consistency_fwhm=9.4, **common)(ld, network)
    assert float(off.mean() / ld.mean()) == pytest.approx(SHRINK, abs=0.005)
    assert float(on.mean() / ld.mean()) == pytest.approx(1.0, abs=0.005)
    # exactly the consistency of the network's output at σ = 9.4 mm / 2.3548 / 4 mm ≈ 1 voxel: fine band kept
    expected = ld_consistency(off[0, 0].numpy(), ld[0, 0].numpy(), consistency_sigma(9.4, (4.0, 4.0, 4.0)))
    assert np.allclose(on[0, 0].numpy(), expected, atol=1e-4)
    assert not np.allclose(on[0, 0].numpy(), ld[0, 0].numpy(), atol=0.01)
