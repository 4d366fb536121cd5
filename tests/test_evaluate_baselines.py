"""m2diff-evaluate's classical baselines and lesion-first report on small hand-made cohorts.

Checks: the Gaussian baseline is scipy's gaussian_filter with σ = FWHM / (2√(2 ln 2)) / spacing; the baselines'
settings are chosen on the validation split only (a cohort whose test split favours another FWHM; the test
subjects are never loaded for tuning; no validation → the documented default, said in the report); lesion
recovery equals a hand computation; t-tests only from n ≥ 5; the report opens with quantitation and holds a row
for LD, every baseline and every prediction, and a table per lesion; the bundle key and the CLI option.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy import stats as sps

from m2diff_monai.data import grid
from m2diff_monai.data.manifest import VOLUME_PATH_KEYS, provenance, write_manifest
from m2diff_monai.evaluation import baselines, cli, metrics, quantitation, run

SHAPE = (30, 32, 22)
SPACING = (2.0, 2.0, 2.5)
FWHM_GRID = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)


def affine() -> np.ndarray:
    a = np.diag([*SPACING, 1.0])
    a[:3, 3] = [-30.0, -32.0, -27.5]
    return a


def save(path: Path, data: np.ndarray, dtype=np.float32, descrip: bytes | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine())
    if descrip:
        img.header["descrip"] = descrip
    nib.save(img, str(path))
    return str(path)


def subject_arrays(seed: int, noise: float) -> dict[str, np.ndarray]:
    """A smooth 'brain' (ellipsoid, GM shell brighter) with a hot and a cold lesion; LD = SD + white noise."""
    rng = np.random.default_rng(seed)
    g = np.indices(SHAPE, dtype=np.float32)
    centre = np.array([15, 16, 11], dtype=np.float32).reshape(3, 1, 1, 1)
    radii = np.array([11, 12, 8], dtype=np.float32).reshape(3, 1, 1, 1)
    r = np.sqrt((((g - centre) / radii) ** 2).sum(0))
    brain = r < 1
    gm = brain & (r > 0.65)
    hot = np.zeros(SHAPE, bool)
    hot[12:15, 10:13, 9:12] = True
    cold = np.zeros(SHAPE, bool)
    cold[17:20, 19:22, 10:13] = True
    activity = brain * (2.0 + 3.0 * gm) + 4.0 * hot - 1.5 * cold
    sd = (ndimage.gaussian_filter(activity.astype(np.float32), 1.2) * 1000).astype(np.float32)
    ld = np.clip(sd + noise * 1000 * rng.standard_normal(SHAPE).astype(np.float32), 0, None)
    return {"sd": sd, "ld": ld, "brain": brain, "lesion_hot": hot, "lesion_cold": cold, "gm": gm}


def rebase_volume(item: dict, root: Path) -> dict:
    """Manifest paths are relative to the manifest's folder (``root``)."""
    rel = lambda p: Path(p).relative_to(root).as_posix() if p else ""  # noqa: E731
    return {
        **{k: rel(v) if k in VOLUME_PATH_KEYS else v for k, v in item.items()},
        "regions": {name: rel(p) for name, p in item["regions"].items()},
    }


def build(root: Path, plan: list[tuple[str, str, float]], with_pred: bool = True) -> dict:
    """Native-grid NIfTIs (masks on the same grid), a manifest with ``plan`` = [(subject, split, noise)], and a
    prediction folder ``Pred`` (SD + a little noise) for every subject."""
    volumes, arrays = [], {}
    for n, (sid, split, noise) in enumerate(plan):
        a = subject_arrays(n + 1, noise)
        arrays[sid] = a
        folder = root / "data" / sid
        item = {
            "subject": sid,
            "split": split,
            "scale": 1.0,
            "offset": 0.0,
            "space": "pet",
            "source_ld_pet": save(folder / "ld.nii.gz", a["ld"], descrip=b"simulated FDG PET, Bq/mL"),
            "source_sd_pet": save(folder / "sd.nii.gz", a["sd"]),
            "brain_mask": save(folder / "brain_mask.nii.gz", a["brain"], np.uint8),
            "regions": {
                r: save(folder / "regions" / f"{r}.nii.gz", a[r], np.uint8) for r in ("gm", "lesion_hot", "lesion_cold")
            },
            "preprocessed_dir": str(folder),
            "mri": "",
            "mri_available": 0,
            "source_mri": "",
        }
        item["ld_pet"], item["sd_pet"] = item["source_ld_pet"], item["source_sd_pet"]
        volumes.append(rebase_volume(item, root))
        if with_pred:
            rng = np.random.default_rng(100 + n)
            save(root / "preds" / "Pred" / f"{sid}.nii.gz", a["sd"] + 50 * rng.standard_normal(SHAPE))
    manifest = write_manifest(
        root / "manifest.json",
        {
            "name": "baselines",
            "training": [],
            "validation": [],
            "test": [],
            "volumes": volumes,
            "provenance": provenance("tests", {}),
        },
    )
    return {"manifest": manifest, "preds": root / "preds" / "Pred", "arrays": arrays, "root": root}


def best_fwhm(arrays: list[dict]) -> float:
    """Independent grid search: mean 3D PSNR in the brain (data range = SD peak in the brain)."""
    scores = []
    for fwhm in FWHM_GRID:
        sigma = [fwhm / (2 * math.sqrt(2 * math.log(2))) / s for s in SPACING]
        scores.append(
            np.mean(
                [
                    metrics.psnr(
                        ndimage.gaussian_filter(a["ld"], sigma, mode="nearest"),
                        a["sd"],
                        a["brain"],
                        float(a["sd"][a["brain"]].max()),
                    )
                    for a in arrays
                ]
            )
        )
    return FWHM_GRID[int(np.argmax(scores))]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Validation subjects are very noisy (a wide Gaussian wins), test subjects barely noisy (a narrow one)."""
    plan = [("v1", "val", 1.6), ("v2", "val", 1.6), ("t1", "test", 0.15), ("t2", "test", 0.15), ("tr1", "train", 0.5)]
    return build(tmp_path_factory.mktemp("cohort"), plan)


def test_gaussian_baseline_is_scipys_filter_with_fwhm_in_mm():
    rng = np.random.default_rng(0)
    ld = rng.random((12, 14, 10)).astype(np.float32)
    spacing = (1.5, 2.0, 3.0)
    expected = ndimage.gaussian_filter(
        ld, [5.0 / (2 * math.sqrt(2 * math.log(2))) / s for s in spacing], mode="nearest"
    )
    np.testing.assert_allclose(baselines.gaussian_baseline(ld, 5.0, spacing), expected, rtol=1e-6, atol=1e-7)
    assert baselines.gaussian_sigma_voxels(2.3548200450309493, (1.0, 2.0, 0.5)) == pytest.approx((1.0, 0.5, 2.0))


def test_fwhm_is_chosen_on_validation_never_on_test(cohort, tmp_path, monkeypatch):
    arrays = cohort["arrays"]
    val_best = best_fwhm([arrays["v1"], arrays["v2"]])
    test_best = best_fwhm([arrays["t1"], arrays["t2"]])
    assert val_best > test_best  # the cohort is built so that tuning on test would pick another FWHM
    loaded: list[tuple[str, bool]] = []
    original = run.load_subject

    def recording(item, base, predictions, space="native"):
        loaded.append((str(item["subject"]), bool(predictions)))
        return original(item, base, predictions, space)

    monkeypatch.setattr(run, "load_subject", recording)
    summary = run.evaluate_cohort(
        cohort["manifest"],
        {"Pred": cohort["preds"]},
        tmp_path / "report",
        baselines="gaussian",
        lpips=False,
        figures=False,
        progress=False,
        baseline_settings=baselines.BaselineSettings(fwhm_grid_mm=FWHM_GRID),
    )
    chosen = summary["baselines"]
    assert chosen["fwhm_mm"] == val_best != test_best
    assert chosen["tuned_on"] == "val" and chosen["tuning_subjects"] == ["v1", "v2"]
    tuning_loads = {sid for sid, with_predictions in loaded if not with_predictions}
    assert tuning_loads == {"v1", "v2"}  # no test (or train) subject is read for tuning
    assert {sid for sid, with_predictions in loaded if with_predictions} == {"t1", "t2"}
    df = pd.read_csv(tmp_path / "report" / "per_subject.csv")
    assert list(dict.fromkeys(df["method"])) == ["LD", "Gaussian", "Pred"]
    g = df[(df["method"] == "Gaussian") & (df["subject"] == "t1")]["psnr"].item()
    a = arrays["t1"]
    sigma = [val_best / (2 * math.sqrt(2 * math.log(2))) / s for s in SPACING]
    assert g == pytest.approx(
        metrics.psnr(ndimage.gaussian_filter(a["ld"], sigma, mode="nearest"), a["sd"], a["brain"]), rel=1e-5
    )
    run_json = json.loads((tmp_path / "report" / "run.json").read_text())
    assert run_json["baselines"]["fwhm_mm"] == val_best
    assert f"FWHM {val_best:g} mm" in (tmp_path / "report" / "report.md").read_text()


def test_without_validation_the_documented_default_is_used_and_said(tmp_path):
    c = build(tmp_path, [("t1", "test", 0.5), ("t2", "test", 0.5)])
    summary = run.evaluate_cohort(
        c["manifest"],
        {"Pred": c["preds"]},
        tmp_path / "report",
        baselines="gaussian",
        lpips=False,
        figures=False,
        progress=False,
    )
    chosen = summary["baselines"]
    assert chosen["fwhm_mm"] == baselines.BaselineSettings().default_fwhm_mm
    assert chosen["tuned_on"] is None and chosen["tuning_subjects"] == []
    report = (tmp_path / "report" / "report.md").read_text()
    assert "documented defaults (not tuned)" in report and "no validation subject" in report


def test_lesion_recovery_equals_a_hand_computation():
    reference = np.zeros((6, 6, 6), np.float32)
    volume = np.zeros_like(reference)
    lesion = np.zeros(reference.shape, bool)
    lesion[1:3, 1:3, 1] = True  # four voxels
    reference[1:3, 1:3, 1] = [[10.0, 20.0], [30.0, 40.0]]
    volume[1:3, 1:3, 1] = [[8.0, 18.0], [20.0, 30.0]]
    volume[5, 5, 5] = 1000.0  # outside the lesion: ignored
    regions = {
        "lesion_hot": (lesion, grid.mask_box(lesion)),
        "gm": (lesion, grid.mask_box(lesion)),
        "lesion_cold": (np.zeros_like(lesion), None),
    }
    row = quantitation.lesion_recovery(volume, reference, regions)
    assert row["recovery_mean_lesion_hot"] == pytest.approx((76.0 / 4) / (100.0 / 4))
    assert row["recovery_max_lesion_hot"] == pytest.approx(30.0 / 40.0)
    assert row["max_pred_lesion_hot"] == 30.0 and row["max_target_lesion_hot"] == 40.0
    assert math.isnan(row["recovery_mean_lesion_cold"]) and math.isnan(row["recovery_max_lesion_cold"])
    assert not any(k.endswith("_gm") for k in row)  # recovery is for lesions only


def test_lesion_ttests_only_from_five_subjects():
    rng = np.random.default_rng(1)

    def frame(n: int) -> pd.DataFrame:
        rows = []
        for i in range(n):
            target = 10.0 + rng.random()
            for method, factor in (("LD", 1.0 + 0.05 * rng.standard_normal()), ("M", 0.8 + 0.01 * rng.random())):
                pred = target * factor
                rows.append(
                    {
                        "subject": f"s{i}",
                        "method": method,
                        "bias_lesion_hot": pred / target - 1,
                        "mean_pred_lesion_hot": pred,
                        "mean_target_lesion_hot": target,
                        "recovery_mean_lesion_hot": pred / target,
                        "recovery_max_lesion_hot": factor,
                        "max_pred_lesion_hot": 2 * pred,
                        "max_target_lesion_hot": 2 * target,
                    }
                )
        return pd.DataFrame(rows)

    few = quantitation.quantitation_markdown(frame(2), ["lesion_hot"], "Bq/mL")
    assert "n = 2 < 5: no t-test" in few
    df = frame(6)
    many = quantitation.quantitation_markdown(df, ["lesion_hot"], "Bq/mL")
    assert "no t-test" not in many
    m = df[df["method"] == "M"]
    p = sps.ttest_rel(m["mean_pred_lesion_hot"], m["mean_target_lesion_hot"]).pvalue
    assert (f"{p:.2e}" if p < 1e-4 else f"{p:.4f}") in many


@pytest.fixture(scope="module")
def full_report(cohort, tmp_path_factory) -> dict:
    """A run with all three baselines and figures (tiny volumes: BM4D takes a second or two here; two NLM
    factors to tune instead of five)."""
    out = tmp_path_factory.mktemp("full") / "report"
    summary = run.evaluate_cohort(
        cohort["manifest"],
        {"Pred": cohort["preds"]},
        out,
        baselines="gaussian,nlm,bm3d",
        lpips=False,
        progress=False,
        baseline_settings={"nlm_h_factors": [0.75, 1.0]},
    )
    return {"summary": summary, "out": out, "report": (out / "report.md").read_text()}


def _table_rows(report: str, heading: str) -> list[str]:
    """Method names of the markdown table following the first line starting with ``heading``."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows, seen_table = [], False
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            seen_table = True
            cell = line.split("|")[1].strip()
            if cell not in ("method", "---") and not cell.startswith("-"):
                rows.append(cell.strip("*"))
        elif seen_table:
            break
    return rows


def test_report_opens_with_quantitation_and_has_every_method_row(full_report):
    report = full_report["report"]
    expected = ["LD", "Gaussian", "NLM", "BM4D", "Pred"]
    quant = report.index("## Quantitation")
    assert quant < report.index("## Image quality") < report.index("## Figures")
    assert _table_rows(report, "### Mean relative bias per region") == expected
    for lesion in ("lesion_hot", "lesion_cold"):
        assert _table_rows(report, f"### Lesion `{lesion}`") == expected, lesion
    assert _table_rows(report, "### Volume metrics") == expected
    assert "n = 2 < 5: no t-test" in report
    assert "FWHM" in report and "h = " in report and "BM4D" in report and "tuned on the `val` split" in report
    assert "Uptake in Bq/mL" in report  # units read from the NIfTI descrip
    run_json = json.loads((full_report["out"] / "run.json").read_text())
    assert run_json["methods"] == expected and run_json["units"] == "Bq/mL"
    assert set(run_json["baselines"]) >= {
        "fwhm_mm",
        "nlm_h_factor",
        "bm4d_sigma_factor",
        "tuned_on",
        "tuning_subjects",
        "grids",
        "noise_sigma",
    }
    assert set(run_json["baselines"]["noise_sigma"]) == {"v1", "v2", "t1", "t2"}
    assert "Noise σ estimated from each LD" in report
    summary = pd.read_csv(full_report["out"] / "summary.csv")
    assert list(summary["method"]) == expected
    assert {"recovery_mean_lesion_hot_mean", "recovery_max_lesion_cold_n", "psnr_mean"} <= set(summary.columns)
    assert (full_report["out"] / "figures" / "t1.png").is_file()


def test_baselines_filter_the_ld_only_inside_the_brain_box(full_report, cohort):
    """NLM/BM4D leave voxels outside the brain box at the LD value; inside they change the LD."""
    a = cohort["arrays"]["t1"]
    settings = baselines.BaselineSettings()
    out = baselines.nlm_baseline(
        a["ld"], a["brain"], 1.0, baselines.estimate_noise_sigma(a["ld"], a["brain"]), settings
    )
    box = baselines.brain_box(a["brain"], settings.margin_voxels)
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    if outside.any():
        np.testing.assert_array_equal(out[outside], a["ld"][outside])
    assert np.abs(out[a["brain"]] - a["ld"][a["brain"]]).mean() > 0


def test_report_check_fails_when_a_row_or_lesion_table_is_missing(full_report):
    """The checks above can fail: drop a row or a lesion table and they do."""
    report = full_report["report"]
    without_row = "\n".join(line for line in report.splitlines() if not line.startswith("| NLM |"))
    assert _table_rows(without_row, "### Lesion `lesion_hot`") != ["LD", "Gaussian", "NLM", "BM4D", "Pred"]
    without_lesion = report.replace("### Lesion `lesion_hot`", "### something else")
    with pytest.raises(StopIteration):
        _table_rows(without_lesion, "### Lesion `lesion_hot`")


def test_bad_baseline_options_are_one_line_errors(cohort, tmp_path, capsys):
    out = tmp_path / "r"
    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Pred={cohort['preds']}",
            "--out",
            str(out),
            "--baselines",
            "gaussian,wiener",
            "--no-progress",
        ]
    )
    assert code == 2 and "unknown baseline 'wiener'" in capsys.readouterr().err and not out.exists()
    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Gaussian={cohort['preds']}",
            "--out",
            str(out),
            "--baselines",
            "gaussian",
            "--no-progress",
        ]
    )
    assert code == 2 and "name of a --baselines row" in capsys.readouterr().err and not out.exists()
    assert baselines.parse_baselines("Gaussian, bm4d,nlm,gaussian") == ("gaussian", "bm3d", "nlm")


def test_bundle_key_passes_the_baselines(cohort, tmp_path):
    for bundle in ("m2diff", "mfdiff"):
        config = json.loads((Path(__file__).parents[1] / "bundles" / bundle / "evaluate.json").read_text())
        assert config["evaluate"]["baselines"] == "@baselines" and "baselines" in config
    summary = run.run_bundle_evaluation(
        manifest=str(cohort["manifest"]),
        predictions={"Pred": str(cohort["preds"])},
        output_dir=str(tmp_path / "b"),
        baselines=["gaussian"],
        lpips=False,
        figures=False,
        progress=False,
    )
    assert summary["methods"] == ["LD", "Gaussian", "Pred"]


def test_a_noiseless_ld_is_returned_unchanged():
    ld = np.full(SHAPE, 1000.0, np.float32)
    brain = np.zeros(SHAPE, bool)
    brain[5:20, 5:20, 5:15] = True
    assert baselines.estimate_noise_sigma(ld, brain) == pytest.approx(0.0, abs=1e-3)
    np.testing.assert_array_equal(baselines.nlm_baseline(ld, brain, 0.8, 0.0), ld)
    np.testing.assert_array_equal(baselines.bm4d_baseline(ld, brain, 1.0, 0.0), ld)


def test_noise_estimate_recovers_white_noise_sigma_on_a_smooth_image():
    """The estimator is exact for white noise (it divides by the residual filter's gain): within 5 %."""
    rng = np.random.default_rng(3)
    a = subject_arrays(3, 0.0)
    smooth = ndimage.gaussian_filter(a["sd"], 3.0)
    noisy = smooth + 300.0 * rng.standard_normal(SHAPE).astype(np.float32)
    assert baselines.estimate_noise_sigma(noisy, a["brain"]) == pytest.approx(300.0, rel=0.05)
