"""Acceptance targets in the report: PSNR margin and SSIM over the best baseline, regional bias, the MRI's gain."""

from __future__ import annotations

import pandas as pd
import pytest

from m2diff_monai.errors import InputError
from m2diff_monai.evaluation.subsets import subset_table
from m2diff_monai.evaluation.targets import DEFAULT_TARGETS, parse_targets, targets_markdown
from m2diff_monai.evaluation.targets import target_table as judge

BASELINES = ["Gaussian", "BM4D"]


def _per_subject() -> pd.DataFrame:
    # two subjects; per method: PSNR, SSIM, bias in a cold lesion and in GM (fractions)
    values = {
        "LD": [(29.0, 0.85, 0.08, 0.00), (29.4, 0.86, 0.02, -0.01)],
        "Gaussian": [(32.8, 0.937, 0.20, -0.05), (33.0, 0.939, 0.18, -0.05)],
        "BM4D": [(32.7, 0.935, 0.12, -0.02), (33.3, 0.936, 0.06, -0.01)],
        "Net": [(34.0, 0.950, 0.15, -0.01), (34.3, 0.951, 0.03, -0.01)],
        "Net-noMRI": [(33.4, 0.940, 0.10, -0.02), (33.5, 0.941, 0.02, -0.02)],
    }
    rows = [
        {"subject": s, "method": m, "psnr": p, "ssim": q, "bias_lesion_cold": c, "bias_gm": g}
        for m, per_subject in values.items()
        for s, (p, q, c, g) in zip(("a", "b"), per_subject, strict=True)
    ]
    return pd.DataFrame(rows)


def target_table(df, groups, regions, baselines, targets):
    """Judge the per-subject table's group means, as the report does (groups: name → subject ids)."""
    return judge(subset_table(df, [(name, tuple(ids)) for name, ids in groups], regions), baselines, targets)


def _check(table, group, method, prefix):
    rows = table[(table["group"] == group) & (table["method"] == method) & table["check"].str.startswith(prefix)]
    assert len(rows) == 1, (group, method, prefix)
    return rows.iloc[0]


def test_checks_against_the_best_baseline_per_group():
    table = target_table(
        _per_subject(), [("all", ["a", "b"]), ("a only", ["a"])], ["lesion_cold", "gm"], BASELINES, DEFAULT_TARGETS
    )
    assert set(table["method"]) == {"Net", "Net-noMRI"}  # LD and baselines are not judged
    # all: BM4D's mean PSNR 33.0 beats the Gaussian's 32.9; Net 34.15 → +1.15 dB
    margin = _check(table, "all", "Net", "PSNR over BM4D")
    assert margin["value"] == pytest.approx(1.15) and margin["met"]
    # a alone: the Gaussian (32.8) is the best baseline there; Net-noMRI +0.6 dB misses the 1 dB margin
    assert not _check(table, "a only", "Net-noMRI", "PSNR over Gaussian")["met"]
    # SSIM against the best baseline SSIM of the group, whichever baseline holds it
    ssim = _check(table, "all", "Net", "SSIM")
    assert ssim["value"] == pytest.approx(0.9505 - 0.938) and ssim["met"]
    # lesion bias: tolerance 5 %, with the LD's own bias beside it
    cold = _check(table, "all", "Net", "lesion_cold")
    assert cold["value"] == pytest.approx(9.0) and not cold["met"] and cold["ld"] == pytest.approx(5.0)
    assert not _check(table, "all", "Net-noMRI", "lesion_cold")["met"]  # (10 % + 2 %) / 2 = 6 %
    gm = _check(table, "all", "Net", "gm")
    assert gm["value"] == pytest.approx(-1.0) and gm["met"]  # other regions: 2 %
    # the MRI's gain: Net over its -noMRI partner, 0.7 dB ≥ 0.5
    gain = _check(table, "all", "Net", "PSNR over Net-noMRI")
    assert gain["value"] == pytest.approx(0.7) and gain["met"]
    assert not table["check"].str.contains("Net-noMRI-noMRI").any()


def test_custom_targets_change_the_verdict_and_off_drops_them():
    loose = parse_targets("margin=0.5,lesion=10")
    assert loose == {**DEFAULT_TARGETS, "margin": 0.5, "lesion": 10.0}
    table = target_table(_per_subject(), [("a only", ["a"])], ["lesion_cold"], BASELINES, loose)
    assert _check(table, "a only", "Net-noMRI", "PSNR over Gaussian")["met"]  # +0.6 dB ≥ 0.5
    assert not _check(table, "a only", "Net", "lesion_cold")["met"]  # +15 % > 10 %
    assert parse_targets("off") is None and parse_targets(None) == DEFAULT_TARGETS
    assert parse_targets("default") == DEFAULT_TARGETS and parse_targets({"mri": 1}) == {**DEFAULT_TARGETS, "mri": 1.0}
    bad_specs = (("margin", "KEY=VALUE"), ("psnr=3", "unknown key"), ("lesion=-1", ">= 0"), ("mri=x", "number"))
    for bad, message in bad_specs:
        with pytest.raises(InputError, match=message):
            parse_targets(bad)


def test_markdown_marks_each_check_and_lists_the_misses_with_the_ld_context():
    table = target_table(_per_subject(), [("all", ["a", "b"])], ["lesion_cold", "gm"], BASELINES, DEFAULT_TARGETS)
    text = targets_markdown(table, DEFAULT_TARGETS, baselines_scored=True)
    assert text.startswith("## Targets") and "| check | target | Net | Net-noMRI | LD |" in text
    assert "| lesion_cold bias (%) | within ±5 | +9.00 ✗ | +6.00 ✗ | +5.00 |" in text
    assert "all: Net lesion_cold bias (%) +9.00, target within ±5 (LD itself +5.0)" in text
    assert "No baselines were scored" not in text
    met = target_table(_per_subject(), [("all", ["a", "b"])], ["gm"], BASELINES, DEFAULT_TARGETS)
    met = met[met["method"] == "Net"]
    assert "Every check is met." in targets_markdown(met, DEFAULT_TARGETS, baselines_scored=True)


def test_a_miss_never_reads_as_the_threshold():
    from m2diff_monai.evaluation.targets import _shown

    assert _shown(0.9976, ">= 1", False, 2) == "+0.998"  # not "+1.00 ✗"
    assert _shown(1.06, ">= 1", True, 2) == "+1.06"
    assert _shown(5.004, "within ±5", False, 2) == "+5.004"
    assert _shown(-0.00004, ">= 0", False, 4) == "-0.00004"


def test_best_baseline_is_the_highest_psnr_among_baseline_rows_only():
    from m2diff_monai.evaluation.baselines import best_baseline

    psnr = {"LD": 29.0, "Gaussian": 32.9, "BM4D": 33.0, "Net": 34.2, "NLM": float("nan")}
    assert best_baseline(psnr) == "BM4D"  # Net is higher but not a baseline; NaN is ignored
    assert best_baseline(psnr, ["Gaussian"]) == "Gaussian" and best_baseline({"LD": 29.0, "Net": 34.0}) is None


def test_a_floor_row_is_context_beside_each_bias_and_in_the_miss_line():
    df = _per_subject()
    floor = df[df["method"] == "LD"].assign(method="floor-7", psnr=36.0, ssim=0.97, bias_lesion_cold=0.06)
    table = target_table(
        pd.concat([df, floor]), [("all", ["a", "b"])], ["lesion_cold", "gm"], BASELINES, DEFAULT_TARGETS
    )
    assert set(table["method"]) == {"Net", "Net-noMRI"}  # a floor beats every baseline but is never judged
    assert _check(table, "all", "Net", "PSNR over BM4D")["value"] == pytest.approx(1.15)  # nor the bar
    cold = _check(table, "all", "Net", "lesion_cold")
    assert cold["floor"] == pytest.approx(6.0) and cold["ld"] == pytest.approx(5.0)
    text = targets_markdown(table, DEFAULT_TARGETS, baselines_scored=True)
    assert "| LD | floor |" in text
    assert "all: Net lesion_cold bias (%) +9.00, target within ±5 (LD itself +5.0; floor +6.0)" in text
    plain = targets_markdown(target_table(df, [("all", ["a", "b"])], ["lesion_cold"], BASELINES, DEFAULT_TARGETS),
                             DEFAULT_TARGETS, baselines_scored=True)  # fmt: skip
    assert "floor" not in plain
