"""The consistency floor: SD + G*(LD − SD), what a perfect network would read after the LD consistency."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from m2diff_monai.inference import consistency_floor, consistency_tuning
from tests.test_evaluate_baselines import SPACING, build


def test_floors_equal_scipys_filter_of_the_ld_error_on_the_ld_grid(tmp_path):
    cohort = build(tmp_path / "c", [("v1", "val", 1.0), ("v2", "val", 1.0), ("t1", "test", 1.0)], with_pred=False)
    folders = consistency_floor.write_floors(cohort["manifest"], "val", [4.0, 8.0], tmp_path / "out")
    assert sorted(folders) == ["floor-4", "floor-8"]
    for sid in ("v1", "v2"):
        a = cohort["arrays"][sid]
        ld_img = nib.load(str(cohort["root"] / "data" / sid / "ld.nii.gz"))
        errors = {}
        for fwhm in (4.0, 8.0):
            img = nib.load(str(folders[f"floor-{fwhm:g}"] / f"{sid}.nii.gz"))
            np.testing.assert_allclose(img.affine, ld_img.affine)
            sigma = [fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / s for s in SPACING]
            expected = a["sd"] + ndimage.gaussian_filter(a["ld"] - a["sd"], sigma, mode="nearest")
            np.testing.assert_allclose(img.get_fdata(), expected, rtol=1e-5, atol=1e-2)
            errors[fwhm] = float(np.sqrt(np.mean((img.get_fdata() - a["sd"])[a["brain"]] ** 2)))
        # a wider filter lets less of the LD's noise through, and both let through less than the LD has
        ld_error = float(np.sqrt(np.mean((a["ld"] - a["sd"])[a["brain"]] ** 2)))
        assert errors[8.0] < errors[4.0] < ld_error
    assert not (folders["floor-4"] / "t1.nii.gz").exists()  # only the asked split


def test_a_subject_without_a_standard_dose_is_named(tmp_path, capsys):
    cohort = build(tmp_path / "c", [("v1", "val", 1.0)], with_pred=False)
    manifest = json.loads(cohort["manifest"].read_text())
    manifest["volumes"][0]["source_sd_pet"] = "data/v1/missing.nii.gz"
    cohort["manifest"].write_text(json.dumps(manifest))
    code = consistency_floor.main(
        ["--manifest", str(cohort["manifest"]), "--fwhm", "7", "--out-dir", str(tmp_path / "out")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "v1" in err and "standard-dose" in err
    assert not (tmp_path / "out" / "floor-7" / "v1.nii.gz").exists()


def test_tuning_table_shows_the_floors_and_never_chooses_one(tmp_path, capsys):
    base = {"ssim_mean": 0.95, "bias_gm_mean": -0.01, "bias_mean": 0.0}
    rows = [
        ("Gaussian", 32.7, 0.13),
        ("fwhm-6", 33.1, 0.14),
        ("fwhm-7", 33.9, 0.15),
        ("floor-6", 36.0, 0.06),
        ("floor-7", 37.0, 0.07),
    ]
    pd.DataFrame([{**base, "method": m, "psnr_mean": p, "bias_lesion_cold_mean": c} for m, p, c in rows]).to_csv(
        tmp_path / "summary.csv", index=False
    )
    assert consistency_tuning.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ld_consistency_fwhm = 7" in out  # the floors' higher PSNR does not enter the choice
    floor_table = out.split("Floor:")[1]
    assert "| 7 | 37.00 |" in floor_table and "+7.0" in floor_table
    saved = json.loads((tmp_path / consistency_tuning.CHOICE_FILE).read_text())
    assert saved["floor_bias_by_fwhm"]["6"]["lesion_cold"] == 0.06 and saved["setting"] == "7"


def test_demo_scripts_show_the_floor_of_the_consistency_their_checkpoints_use():
    """The main job's and the MFdiff demo's reports carry the floor at the FWHM their demo.json stores."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for script, bundle in (("main_job.sh", "m2diff"), ("mfdiff_demo.sh", "mfdiff")):
        stored = json.loads((root / "bundles" / bundle / "demo.json").read_text())["inference_defaults"]
        passed = re.findall(r"--floor-fwhm (\S+)", (root / "scripts" / script).read_text())
        assert [float(v) for v in passed] == [stored["ld_consistency_fwhm"]], script
