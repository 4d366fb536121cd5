"""Choosing the LD-consistency FWHM on validation: the smallest FWHM that keeps the PSNR margin."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from m2diff_monai.errors import InputError
from m2diff_monai.inference.consistency_tuning import (
    CHOICE_FILE,
    candidate_fwhm,
    choose_from_summary,
    choose_fwhm,
    main,
)


def test_candidate_names():
    assert candidate_fwhm("fwhm-7") == 7.0 and candidate_fwhm("fwhm-6.5") == 6.5
    assert candidate_fwhm("fwhm-off") == math.inf
    assert candidate_fwhm("M2Diff") is None and candidate_fwhm("fwhm-x") is None and candidate_fwhm("fwhm-0") is None


def test_smallest_fwhm_that_keeps_the_margin():
    psnr = {4.0: 30.1, 5.0: 31.8, 6.0: 33.1, 7.0: 33.9, 8.0: 34.5, math.inf: 34.1}
    choice = choose_fwhm(psnr, "Gaussian", 32.73, margin_db=1.0)
    assert choice.fwhm_mm == 7.0 and choice.margin_met and choice.setting() == "7"
    # a smaller margin admits a smaller FWHM; the rule does not chase the highest PSNR (8 mm here)
    assert choose_fwhm(psnr, "Gaussian", 32.73, margin_db=0.3).fwhm_mm == 6.0


def test_no_candidate_reaches_the_margin_takes_the_best_psnr_and_says_so():
    choice = choose_fwhm({4.0: 30.0, 8.0: 31.5, math.inf: 31.0}, "BM4D", 31.0, margin_db=1.0)
    assert choice.fwhm_mm == 8.0 and not choice.margin_met
    off = choose_fwhm({4.0: 30.0, math.inf: 33.0}, "BM4D", 31.0, margin_db=1.0)
    assert off.fwhm_mm is None and off.setting() == "none" and off.margin_met  # off only when nothing else passes


def _summary(rows):
    base = {"ssim_mean": 0.9, "bias_lesion_cold_mean": 0.1, "bias_gm_mean": -0.01, "bias_mean": 0.0}
    return pd.DataFrame([{**base, "method": m, "psnr_mean": p} for m, p in rows])


def test_choice_from_an_evaluation_summary_uses_the_best_baseline():
    summary = _summary([("LD", 28.7), ("Gaussian", 32.7), ("BM4D", 32.6), ("fwhm-6", 33.1), ("fwhm-7", 33.9)])
    choice, candidates = choose_from_summary(summary)
    assert choice.best_baseline == "Gaussian" and choice.fwhm_mm == 7.0
    assert list(candidates["method"]) == ["fwhm-6", "fwhm-7"]
    with pytest.raises(InputError, match="--baselines"):
        choose_from_summary(_summary([("LD", 28.7), ("fwhm-7", 33.9)]))
    with pytest.raises(InputError, match="fwhm-"):
        choose_from_summary(_summary([("Gaussian", 32.7), ("M2Diff", 33.9)]))


def test_command_prints_the_table_and_writes_the_choice(tmp_path, capsys):
    _summary([("Gaussian", 32.7), ("fwhm-5", 31.8), ("fwhm-7", 33.9), ("fwhm-off", 34.1)]).to_csv(
        tmp_path / "summary.csv", index=False
    )
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| off |" in out and "ld_consistency_fwhm = 7" in out
    saved = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert saved["setting"] == "7" and saved["margin_met"] and saved["psnr_by_fwhm"]["off"] == 34.1

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "summary.csv" in capsys.readouterr().err and not (empty / CHOICE_FILE).exists()


def test_script_refuses_the_test_split_and_shows_its_usage():
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "tune_consistency.sh"
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "BUNDLE CHECKPOINT" in usage.stderr
    env = {**os.environ, "SPLIT": "test"}
    refused = subprocess.run(["bash", str(script), "b", "c"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "use val" in refused.stderr
