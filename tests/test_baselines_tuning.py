"""The one tuning rule NLM and BM4D share (``baselines._tune_noise_factor``): search a grid of several values on
validation, take a one-value grid as given, fall back to the documented default without validation."""

from __future__ import annotations

import numpy as np
import pytest

from m2diff_monai.evaluation import baselines
from m2diff_monai.evaluation.metrics import psnr, resolve_data_range


@pytest.fixture()
def case() -> baselines.TuningCase:
    rng = np.random.default_rng(3)
    reference = np.zeros((14, 14, 14), np.float32)
    reference[3:11, 3:11, 3:11] = 10.0
    reference[5:9, 5:9, 5:9] = 20.0
    mask = reference > 0
    ld = reference + rng.normal(0.0, 2.0, reference.shape).astype(np.float32)
    return baselines.TuningCase("v1", ld, reference, mask, (2.0, 2.0, 2.0))


def test_without_validation_both_use_their_documented_defaults():
    settings = baselines.BaselineSettings(
        nlm_h_factors=(0.5, 0.7),
        bm4d_sigma_factors=(1.5, 2.0),
        default_nlm_h_factor=0.8,
        default_bm4d_sigma_factor=1.25,
    )
    chosen = baselines.choose_settings(("nlm", "bm3d"), [], settings)
    assert (chosen.nlm_h_factor, chosen.bm4d_sigma_factor) == (0.8, 1.25)
    assert chosen.curves == {} and chosen.tuned_on is None
    assert any("defaults" in note for note in chosen.notes)


def test_a_one_value_grid_is_taken_as_given_without_filtering(case, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a one-value grid must not be scored")

    monkeypatch.setattr(baselines, "nlm_baseline", never)
    monkeypatch.setattr(baselines, "bm4d_baseline", never)
    settings = baselines.BaselineSettings(nlm_h_factors=(0.6,), bm4d_sigma_factors=(2.0,))
    chosen = baselines.choose_settings(("nlm", "bm3d"), [case], settings)
    assert (chosen.nlm_h_factor, chosen.bm4d_sigma_factor) == (0.6, 2.0)
    assert chosen.curves == {} and chosen.tuned_on == "val"


def test_a_grid_is_searched_by_mean_psnr_and_its_curve_recorded(case):
    grid = (0.25, 1.3)
    settings = baselines.BaselineSettings(nlm_h_factors=grid)
    chosen = baselines.choose_settings(("nlm",), [case], settings)
    sigma = baselines.estimate_noise_sigma(case.ld, case.mask)
    data_range = resolve_data_range(case.reference, case.mask)
    expected = [
        psnr(baselines.nlm_baseline(case.ld, case.mask, h, sigma, settings), case.reference, case.mask, data_range)
        for h in grid
    ]
    assert chosen.curves["nlm"]["h_factor"] == list(grid)
    assert chosen.curves["nlm"]["mean_psnr"] == pytest.approx(expected, abs=1e-4)
    assert chosen.nlm_h_factor == grid[int(np.argmax(expected))]
    rows, _ = baselines.apply_baselines(case.ld, case.mask, case.spacing, chosen, "t1")
    np.testing.assert_array_equal(
        rows["NLM"], baselines.nlm_baseline(case.ld, case.mask, chosen.nlm_h_factor, sigma, settings)
    )
