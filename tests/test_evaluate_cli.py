"""m2diff-evaluate: a hand-made manifest of tiny subjects (one stored LPS) with known predictions.

Methods: ``Good`` = SD + small noise, ``Same`` = SD exactly; LD = SD + more noise. Checks: files and rows, LD
worse than Good, Same perfect, numbers equal an independent computation on the canonical arrays, t-tests equal
scipy's, LPIPS unavailable with its reason (and the code path with a random backbone), figures, one-line errors
with no report written, keep-going, preprocessed space, complexity sources, CKA on a tiny M2Diff, the bundle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from scipy import stats as sps

from m2diff_monai.data import grid
from m2diff_monai.errors import InputError
from m2diff_monai.evaluation import cli, complexity, inputs, metrics, paper_protocol, run, scoring
from m2diff_monai.evaluation.lpips_metric import LPIPSMetric
from tiny_networks import save_checkpoint, tiny_m2diff

NATIVE = (36, 40, 20)
SIZE = 32
START = (2, 4, -6)  # cube voxel 0 on the canonical native grid (z padded)
SPACING = 2.0
SUBJECTS = ("s01", "s02", "s03")
REGIONS = ("gm", "wm", "lesion_hot")
TINY_M2DIFF = tiny_m2diff(SIZE)


def canonical_affine() -> np.ndarray:
    return np.diag([SPACING, SPACING, SPACING, 1.0]) + np.array(
        [[0, 0, 0, -36.0], [0, 0, 0, -40.0], [0, 0, 0, -20.0], [0, 0, 0, 0]]
    )


def lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with x and y flipped (an LPS file): same world, other voxel order."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = data.shape[0] - 1, data.shape[1] - 1
    return data[::-1, ::-1].copy(), affine @ flip


def save(path: Path, data: np.ndarray, affine: np.ndarray, dtype=np.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), affine), str(path))
    return str(path)


def phantom(seed: int) -> dict[str, np.ndarray]:
    """Canonical arrays on the native grid: SD, LD, predictions, brain mask, regions."""
    rng = np.random.default_rng(seed)
    g = np.indices(NATIVE, dtype=np.float32)
    centre = np.array([18, 20, 9], dtype=np.float32).reshape(3, 1, 1, 1)
    r = np.sqrt((((g - centre) / np.array([12, 14, 7], dtype=np.float32).reshape(3, 1, 1, 1)) ** 2).sum(0))
    brain = r < 1
    gm = brain & (r > 0.7)
    wm = brain & (r < 0.5)
    lesion = np.zeros(NATIVE, bool)
    if seed != 2:  # s02 has no lesion: its lesion bias is NaN
        lesion[16:20, 18:22, 8:11] = True
    sd = ndimage.gaussian_filter(brain * (2.0 + 3.0 * gm + rng.random(NATIVE)), 1.0).astype(np.float32) * 1000
    sd[lesion] *= 1.5
    noise = rng.standard_normal(NATIVE).astype(np.float32) * 1000
    return {
        "sd": sd,
        "ld": np.clip(sd + 0.8 * noise, 0, None),
        "good": sd + 0.1 * noise,
        "same": sd.copy(),
        "brain": brain,
        "gm": gm,
        "wm": wm,
        "lesion_hot": lesion,
    }


def build_cohort(root: Path, with_mri: bool = False) -> dict:
    """Raw files, preprocessed cubes, subject.json, manifest and prediction folders for SUBJECTS."""
    raw, prep, manifests = root / "raw", root / "prep", root / "manifests"
    affine = canonical_affine()
    cube_affine = affine.copy()
    cube_affine[:3, 3] = affine[:3, :3] @ np.array(START) + affine[:3, 3]
    volumes, arrays = [], {}
    for n, sid in enumerate(SUBJECTS):
        a = phantom(n + 1)
        arrays[sid] = a
        store = (lambda d: lps(d, affine)) if sid == "s02" else (lambda d: (d, affine))
        for key, name in (("ld", "ld_pet"), ("sd", "sd_pet")):
            save(raw / sid / f"{name}.nii.gz", *store(a[key]))
        for method, key in (("Good", "good"), ("Same", "same")):
            save(root / "preds" / method / f"{sid}.nii.gz", *store(a[key]))
        folder = prep / "subjects" / sid
        cut = lambda d: grid.crop(d, START, SIZE)  # noqa: E731
        scale = float(np.percentile(a["ld"][a["brain"]], 99.5))
        save(folder / "ld_pet.nii.gz", cut(a["ld"]) / scale, cube_affine)
        save(folder / "sd_pet.nii.gz", cut(a["sd"]) / scale, cube_affine)
        save(folder / "brain_mask.nii.gz", cut(a["brain"]), cube_affine, np.uint8)
        for region in REGIONS:
            save(folder / "regions" / f"{region}.nii.gz", cut(a[region]), cube_affine, np.uint8)
        if with_mri:
            save(folder / "mri.nii.gz", cut(ndimage.gaussian_filter(a["brain"] * 1.0, 1)), cube_affine)
        record = {
            "subject": sid,
            "space": "pet",
            "crop": {"start": list(START), "size": SIZE},
            "normalization": {
                "method": "shared",
                "scale": scale,
                "offset": 0.0,
                "per_volume": {"ld_pet": {"scale": scale, "offset": 0.0}, "sd_pet": {"scale": scale, "offset": 0.0}},
            },
        }
        (folder / "subject.json").write_text(json.dumps(record))
        rel = lambda p: Path("..", p.relative_to(root)).as_posix()  # noqa: E731
        volumes.append(
            {
                "subject": sid,
                "split": "test",
                "ld_pet": rel(folder / "ld_pet.nii.gz"),
                "sd_pet": rel(folder / "sd_pet.nii.gz"),
                "mri": rel(folder / "mri.nii.gz") if with_mri else "",
                "brain_mask": rel(folder / "brain_mask.nii.gz"),
                "scale": scale,
                "offset": 0.0,
                "source_ld_pet": rel(raw / sid / "ld_pet.nii.gz"),
                "source_sd_pet": rel(raw / sid / "sd_pet.nii.gz"),
                "source_mri": "",
                "mri_available": int(with_mri),
                "regions": {r: rel(folder / "regions" / f"{r}.nii.gz") for r in REGIONS},
                "preprocessed_dir": rel(folder),
                "subject_json": rel(folder / "subject.json"),
                "space": "pet",
                "drf": 100,
            }
        )
    manifest = manifests / "tiny.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(
        json.dumps(
            {
                "name": "tiny",
                "training": [],
                "validation": [],
                "test": [],
                "volumes": volumes,
                "provenance": {
                    "tool": "test",
                    "version": "0",
                    "created": "2024-01-01T00:00:00Z",
                    "parameters": {"size": SIZE},
                    "notes": "",
                },
            }
        )
    )
    return {"root": root, "manifest": manifest, "preds": root / "preds", "arrays": arrays}


@pytest.fixture(autouse=True)
def no_lpips_weights(monkeypatch, tmp_path):
    """No AlexNet weights anywhere: LPIPS must report itself unavailable, never download or go random."""
    monkeypatch.delenv("M2DIFF_LPIPS_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    return build_cohort(tmp_path_factory.mktemp("cohort"), with_mri=True)


@pytest.fixture(scope="module")
def report(cohort, tmp_path_factory) -> dict:
    """One full CLI run shared by the read-only checks."""
    mp = pytest.MonkeyPatch()
    mp.delenv("M2DIFF_LPIPS_ALEXNET_WEIGHTS", raising=False)
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    out = tmp_path_factory.mktemp("reports") / "tiny"
    try:
        code = cli.main(
            [
                "--manifest",
                str(cohort["manifest"]),
                "--pred",
                f"Good={cohort['preds'] / 'Good'}",
                "--pred",
                f"Same={cohort['preds'] / 'Same'}",
                "--out",
                str(out),
                "--per-slice",
                "--no-progress",
                "--subset",
                f"first={SUBJECTS[0]}",
                "--subset",
                f"others={','.join(SUBJECTS[1:])}",
            ]
        )
    finally:
        mp.undo()
    return {"code": code, "out": out, "per_subject": pd.read_csv(out / "per_subject.csv")}


def test_report_files_rows_and_columns(report):
    assert report["code"] == 0
    out, df = report["out"], report["per_subject"]
    for name in (
        "per_subject.csv",
        "per_slice.csv",
        "summary.csv",
        "summary.md",
        "ttests.csv",
        "ttests.md",
        "complexity.md",
        "complexity.json",
        "report.md",
        "run.json",
    ):
        assert (out / name).is_file(), name
    assert len(df) == len(SUBJECTS) * 3
    assert list(df["method"][:3]) == ["LD", "Good", "Same"]
    for column in (
        "subject",
        "method",
        "psnr",
        "ssim",
        "nmse",
        "lpips",
        "bias",
        "bias_gm",
        "bias_wm",
        "bias_lesion_hot",
        "psnr_2d_axial",
        "ssim_2d",
        "nmse_2d_sagittal",
        "data_range",
    ):
        assert column in df.columns, column
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["method"]) == ["LD", "Good", "Same"]
    assert {"psnr_mean", "psnr_std", "psnr_n", "bias_lesion_hot_n"} <= set(summary.columns)
    assert summary.loc[summary["method"] == "LD", "bias_lesion_hot_n"].item() == 2  # s02 has no lesion
    slices = pd.read_csv(out / "per_slice.csv")
    assert set(slices["orientation"]) == {"axial", "coronal", "sagittal"}
    assert set(slices["method"]) == {"LD", "Good", "Same"}
    assert (slices.groupby(["subject", "method", "orientation"]).size() > 3).all()
    assert not (out.parent / f".{out.name}.tmp-").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_subsets_are_the_mean_of_their_subjects_rows(report):
    # --subset: per-group means in subsets.csv and a report section, so a pooled mean cannot hide a group
    table = pd.read_csv(report["out"] / "subsets.csv")
    df = report["per_subject"]
    assert list(dict.fromkeys(table["subset"])) == ["first", "others"]
    for (subset, method), row in table.set_index(["subset", "method"]).iterrows():
        members = [SUBJECTS[0]] if subset == "first" else SUBJECTS[1:]
        rows = df[(df["method"] == method) & df["subject"].isin(members)]
        assert row["n"] == len(members) == len(rows) and row["subjects"].split() == list(rows["subject"])
        for column in ("psnr", "ssim", *(c for c in table.columns if c.startswith("bias_"))):
            assert row[column] == pytest.approx(rows[column].mean(), rel=1e-9, abs=1e-12), (subset, method, column)
    text = (report["out"] / "report.md").read_text()
    assert "## By subset" in text and f"### first (n = 1: {SUBJECTS[0]})" in text and "### others" in text
    run = json.loads((report["out"] / "run.json").read_text())
    assert run["options"]["subsets"] == {"first": [SUBJECTS[0]], "others": list(SUBJECTS[1:])}


def test_targets_judge_each_method_per_group_with_the_ld_beside(report):
    # the Targets section: each judged method's group mean against its tolerance, the LD's own bias as context
    table = pd.read_csv(report["out"] / "targets.csv")
    df = report["per_subject"]
    assert list(dict.fromkeys(table["group"])) == ["all subjects", "first", "others"]
    assert set(table["method"]) == {"Good", "Same"}  # LD is context, not judged
    groups = {"all subjects": list(SUBJECTS), "first": [SUBJECTS[0]], "others": list(SUBJECTS[1:])}
    assert table["check"].str.endswith("bias (%)").all()  # no baselines, no -noMRI partner: bias checks only
    for row in table.itertuples():
        column = "bias_" + row.check.removesuffix(" bias (%)")
        part = df[df["subject"].isin(groups[row.group])]
        mean = 100.0 * part.loc[part["method"] == row.method, column].mean()
        assert row.value == pytest.approx(mean, abs=1e-9)
        assert row.ld == pytest.approx(100.0 * part.loc[part["method"] == "LD", column].mean(), abs=1e-9)
        assert row.met == (abs(mean) <= (5.0 if "lesion" in column else 2.0))
    text = (report["out"] / "report.md").read_text()
    assert "## Targets" in text and "No baselines were scored" in text
    assert text.index("## Targets") < text.index("## By subset")
    run = json.loads((report["out"] / "run.json").read_text())
    assert run["options"]["targets"] == {"margin": 1.0, "lesion": 5.0, "region": 2.0, "mri": 0.5}


def test_floor_row_is_scored_shown_beside_the_targets_and_never_judged(cohort, tmp_path, monkeypatch):
    """--floor-fwhm: SD + G*(LD − SD) on the native grid as the reference row floor-6, with its bias beside each
    bias target (the part of a miss the LD's noise imposes) and not judged itself."""
    from scipy import ndimage

    monkeypatch.delenv("M2DIFF_LPIPS_ALEXNET_WEIGHTS", raising=False)
    out = tmp_path / "floor"
    args = ["--manifest", str(cohort["manifest"]), "--pred", f"Good={cohort['preds'] / 'Good'}", "--out", str(out)]
    assert cli.main([*args, "--floor-fwhm", "6", "--no-progress", "--no-figures", "--no-lpips"]) == 0
    df = pd.read_csv(out / "per_subject.csv").set_index(["subject", "method"])
    sigma = 6.0 / (2.0 * math.sqrt(2.0 * math.log(2.0))) / SPACING
    for sid in ("s01", "s02"):  # s02 is stored LPS: the floor must still be computed on the canonical grid
        a = cohort["arrays"][sid]
        floor = a["sd"] + ndimage.gaussian_filter(a["ld"] - a["sd"], sigma, mode="nearest")
        expected = metrics.relative_bias(floor, a["sd"], a["gm"])
        assert df.loc[(sid, "floor-6"), "bias_gm"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
        assert df.loc[(sid, "floor-6"), "psnr"] == pytest.approx(metrics.psnr(floor, a["sd"], a["brain"]), rel=1e-5)
    table = pd.read_csv(out / "targets.csv")
    assert set(table["method"]) == {"Good"}  # the floor is context, like the LD
    gm = table[(table["group"] == "all subjects") & (table["check"] == "gm bias (%)")].iloc[0]
    assert gm["floor"] == pytest.approx(100.0 * df.xs("floor-6", level="method")["bias_gm"].mean(), abs=1e-9)
    text = (out / "report.md").read_text()
    targets = text[text.index("## Targets") :]
    assert "| check | target | Good | LD | floor |" in targets and "floor column is SD + G*(LD − SD)" in targets
    assert json.loads((out / "run.json").read_text())["options"]["floor_fwhm"] == 6.0

    clash = cli.main([*args[:2], "--pred", f"floor-6={cohort['preds'] / 'Good'}", "--out", str(tmp_path / "c"),
                      "--floor-fwhm", "6", "--no-progress", "--no-lpips"])  # fmt: skip
    assert clash == 2 and not (tmp_path / "c").exists()
    assert cli.main([*args[:4], "--out", str(tmp_path / "z"), "--floor-fwhm", "0", "--no-lpips"]) == 2


def test_ld_scores_worse_and_identical_prediction_is_perfect(report):
    df = report["per_subject"].set_index(["subject", "method"])
    for sid in SUBJECTS:
        ld, good, same = df.loc[(sid, "LD")], df.loc[(sid, "Good")], df.loc[(sid, "Same")]
        assert ld["psnr"] < good["psnr"] and ld["ssim"] < good["ssim"] and ld["nmse"] > good["nmse"]
        assert ld["psnr_2d_axial"] < good["psnr_2d_axial"]
        assert same["nmse"] == 0 and same["bias"] == 0 and same["bias_gm"] == 0
        assert same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["ssim_2d"] == pytest.approx(1.0, abs=1e-6)
        assert math.isinf(same["psnr"])
    assert math.isnan(df.loc[("s02", "Good"), "bias_lesion_hot"])


def test_metrics_equal_an_independent_computation_on_canonical_arrays(report, cohort):
    """s02 is stored LPS: its masks and prediction must still line up voxel for voxel."""
    df = report["per_subject"].set_index(["subject", "method"])
    for sid in ("s01", "s02"):
        a = cohort["arrays"][sid]
        assert df.loc[(sid, "Good"), "psnr"] == pytest.approx(metrics.psnr(a["good"], a["sd"], a["brain"]), rel=1e-6)
        assert df.loc[(sid, "LD"), "nmse"] == pytest.approx(metrics.nmse(a["ld"], a["sd"], a["brain"]), rel=1e-6)
        assert df.loc[(sid, "Good"), "bias_gm"] == pytest.approx(
            metrics.relative_bias(a["good"], a["sd"], a["gm"]), rel=1e-6, abs=1e-9
        )
        assert df.loc[(sid, "Good"), "data_range"] == pytest.approx(float(a["sd"][a["brain"]].max()), rel=1e-6)
        per_slice = metrics.per_slice_metrics(
            a["good"], a["sd"], a["brain"], float(a["sd"][a["brain"]].max()), 2, min_slice_voxels=16
        )
        assert df.loc[(sid, "Good"), "ssim_2d_axial"] == pytest.approx(np.nanmean(per_slice["ssim"]), rel=1e-6)


def test_ttests_match_scipy(report):
    df, tt = report["per_subject"], pd.read_csv(report["out"] / "ttests.csv")
    wide = df.pivot(index="subject", columns="method", values="psnr")
    expected = sps.ttest_rel(wide["LD"], wide["Good"])
    row = tt[(tt["metric"] == "psnr") & (tt["method_a"] == "LD") & (tt["method_b"] == "Good")].iloc[0]
    assert row["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert row["t"] == pytest.approx(expected.statistic, rel=1e-9)
    pairs = set(zip(tt["method_a"], tt["method_b"], strict=True))
    assert {("LD", "Good"), ("LD", "Same"), ("Good", "Same")} <= pairs  # vs LD, and between methods
    nm = tt[(tt["metric"] == "nmse") & (tt["method_a"] == "Good") & (tt["method_b"] == "Same")].iloc[0]
    ref = sps.ttest_rel(
        df.pivot(index="subject", columns="method", values="nmse")["Good"],
        df.pivot(index="subject", columns="method", values="nmse")["Same"],
    )
    assert nm["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert "lpips" not in set(tt["metric"])  # all NaN: not tested


def test_lpips_unavailable_is_reported_with_its_reason(report):
    df = report["per_subject"]
    assert df["lpips"].isna().all()
    run_json = json.loads((report["out"] / "run.json").read_text())
    assert run_json["lpips"]["available"] is False
    assert run_json["threads"]["threads"] >= 1 and run_json["threads"]["source"]  # m2diff_monai.runtime's decision
    reason = run_json["lpips"]["reason"]
    assert reason.startswith("LPIPS unavailable") and "M2DIFF_LPIPS_ALEXNET_WEIGHTS" in reason and "\n" not in reason
    assert reason in (report["out"] / "summary.md").read_text()
    assert (report["out"] / "report.md").read_text().count(reason) == 1  # once, in the header list


def test_figures_written_and_linked(report):
    out = report["out"]
    text = (out / "report.md").read_text()
    for sid in SUBJECTS:
        png = out / "figures" / f"{sid}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figures/{sid}.png)" in text
    summary_md = (out / "summary.md").read_text()
    assert summary_md.index("| LD |") < summary_md.index("| Good |") < summary_md.index("| Same |")
    assert "±" in summary_md


def test_missing_prediction_is_one_line_and_writes_nothing(cohort, tmp_path, capsys):
    preds = tmp_path / "partial"
    preds.mkdir()
    for sid in ("s01", "s03"):
        (preds / f"{sid}.nii.gz").symlink_to(cohort["preds"] / "Good" / f"{sid}.nii.gz")
    out = tmp_path / "out"
    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Partial={preds}",
            "--out",
            str(out),
            "--no-progress",
            "--no-lpips",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "subject s02" in err and "Partial" in err and "s02.nii.gz" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Partial={preds}",
            "--out",
            str(out),
            "--no-progress",
            "--no-lpips",
            "--keep-going",
            "--no-figures",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "s02" in err
    df = pd.read_csv(out / "per_subject.csv")
    assert sorted(set(df["subject"])) == ["s01", "s03"]
    assert "s02" in json.loads((out / "run.json").read_text())["failed"]


def test_bad_inputs_are_one_line_errors(cohort, tmp_path, capsys):
    shifted = tmp_path / "shifted"
    for sid in SUBJECTS:
        img = nib.load(cohort["preds"] / "Good" / f"{sid}.nii.gz")
        save(shifted / f"{sid}.nii.gz", np.asarray(img.dataobj)[1:], img.affine)
    base = ["--manifest", str(cohort["manifest"]), "--no-progress", "--no-lpips"]
    assert cli.main([*base, "--pred", f"Off={shifted}", "--out", str(tmp_path / "o1")]) == 2
    assert "not on the low-dose PET's grid" in capsys.readouterr().err
    assert cli.main([*base, "--pred", f"LD={shifted}", "--out", str(tmp_path / "o2")]) == 2
    assert "reserved" in capsys.readouterr().err
    assert cli.main([*base, "--pred", f"X={tmp_path / 'nowhere'}", "--out", str(tmp_path / "o3")]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = ["--pred", f"Good={cohort['preds'] / 'Good'}"]
    assert cli.main([*base, *good, "--subset", "typo=nobody-*", "--out", str(tmp_path / "o4")]) == 2
    assert "--subset typo=nobody-* matches none of the subjects evaluated" in capsys.readouterr().err
    assert cli.main([*base, *good, "--subset", "no-pattern", "--out", str(tmp_path / "o5")]) == 2
    assert "--subset must be NAME=PATTERN" in capsys.readouterr().err
    assert cli.main([*base, *good, "--targets", "margin=x", "--out", str(tmp_path / "o6")]) == 2
    assert "--targets margin must be a number" in capsys.readouterr().err
    assert not (tmp_path / "o6").exists()
    assert not (tmp_path / "o4").exists() and not (tmp_path / "o5").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert cli.main([*base, "--pred", f"Good={cohort['preds'] / 'Good'}", "--out", str(foreign)]) == 2
    assert "not an m2diff-evaluate report" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_preprocessed_space_agrees_with_native_and_replaces_old_report(cohort, tmp_path):
    kwargs = dict(lpips=False, figures=False, progress=False)
    out = tmp_path / "rep"
    native = run.evaluate_cohort(cohort["manifest"], {"Good": cohort["preds"] / "Good"}, out, **kwargs)
    assert native["options"]["space"] == "native"
    a = pd.read_csv(out / "per_subject.csv")
    run.evaluate_cohort(cohort["manifest"], {"Good": cohort["preds"] / "Good"}, out, space="preprocessed", **kwargs)
    b = pd.read_csv(out / "per_subject.csv")  # the old report was replaced
    assert json.loads((out / "run.json").read_text())["options"]["space"] == "preprocessed"
    for column in ("psnr", "nmse", "bias", "bias_gm", "data_range"):  # the brain lies inside the cube
        np.testing.assert_allclose(b[column], a[column], rtol=2e-5, err_msg=column)
    # SSIM only differs near the image border (the native grid is 20 slices in z, the cube pads it to 32)
    np.testing.assert_allclose(b["ssim"], a["ssim"], atol=2e-3)


def test_lpips_code_path_with_a_random_backbone(cohort, tmp_path):
    metric = LPIPSMetric(_allow_random_backbone=True)
    run.evaluate_cohort(
        cohort["manifest"],
        {"Same": cohort["preds"] / "Same", "Good": cohort["preds"] / "Good"},
        tmp_path / "rep",
        subjects=["s01"],
        lpips=metric,
        figures=False,
        progress=False,
    )
    df = pd.read_csv(tmp_path / "rep" / "per_subject.csv").set_index("method")
    assert df.loc["Same", "lpips"] == pytest.approx(0.0, abs=1e-6)
    assert df.loc["LD", "lpips"] > df.loc["Good", "lpips"] > 0
    assert "random AlexNet backbone" in (tmp_path / "rep" / "summary.md").read_text()


def save_tiny_checkpoint(path: Path, config: dict, epoch: int = 2, iteration: int = 20) -> Path:
    from m2diff_monai.networks.factory import build_network

    torch.manual_seed(0)
    net = build_network(config)
    data = {"size": SIZE, "normalization": "shared", "space": "pet"}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(path, net, None, data, epoch=epoch, iteration=iteration)


def test_complexity_from_checkpoint_logs_and_inference_summary(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from m2diff_monai.networks.factory import build_network, count_parameters

    ckpt = save_tiny_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", TINY_M2DIFF, epoch=2, iteration=20)
    info = complexity.parameters_from_checkpoint(ckpt)
    assert info["parameters"] == count_parameters(build_network(TINY_M2DIFF))
    writer = SummaryWriter(log_dir=str(tmp_path / "run" / "logs"))
    for step in range(1, 21):  # 3 s per iteration, 10 iterations per epoch
        writer.add_scalar("train_loss", 1.0 / step, step, walltime=1000.0 + 3.0 * step)
    writer.close()
    assert complexity.training_seconds_per_epoch(ckpt, info)["train_seconds_per_epoch"] == pytest.approx(30.0)
    (tmp_path / "run" / "train.log").write_text(
        "2024 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[1] Complete. Time taken: 00:00:12.000\n"
        "2024 - ignite.engine.engine.SupervisedEvaluator - INFO - Epoch[1] Complete. Time taken: 00:09:00.000\n"
        "2024 - ignite.engine.engine.SupervisedTrainer - INFO - Epoch[2] Complete. Time taken: 00:01:02.000\n"
    )
    found = complexity.training_seconds_per_epoch(ckpt, info)
    assert found["train_seconds_per_epoch"] == pytest.approx(37.0) and found["epochs"] == 2
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "predictions.json").write_text(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "settings": {"device": "cpu"},
                "subjects": [
                    {"subject": "a", "seconds": {"sampling": 10.0, "writing": 1.0}},
                    {"subject": "b", "seconds": {"sampling": 12.0, "writing": 1.0}},
                ],
            }
        )
    )
    timings = tmp_path / "baseline.json"
    timings.write_text(json.dumps({"parameters": 2.9e6, "train_seconds_per_epoch": 218.28}))
    inputs = complexity.gather_inputs(
        ["M2Diff", "Baseline"], {"M2Diff": preds, "Baseline": tmp_path}, {}, {"Baseline": timings}
    )
    rows = {r["method"]: r for r in complexity.complexity_rows(inputs)}
    assert rows["M2Diff"]["parameters"] == info["parameters"]  # checkpoint found through predictions.json
    assert rows["M2Diff"]["inference_seconds_per_subject"] == pytest.approx(12.0)
    assert rows["M2Diff"]["train_seconds_per_epoch"] == pytest.approx(37.0)
    assert rows["Baseline"]["parameters"] == 2.9e6 and rows["Baseline"]["inference_seconds_per_subject"] is None
    text = complexity.complexity_markdown(list(rows.values()))
    assert "| M2Diff |" in text and "37.00" in text and "2.90 M" in text
    with pytest.raises(InputError, match="no --pred"):
        complexity.gather_inputs(["A"], {}, {"B": ckpt}, {})


def test_cka_heatmaps_from_a_tiny_m2diff(cohort, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "m2diff.pt", TINY_M2DIFF)
    out = tmp_path / "rep"
    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Good={cohort['preds'] / 'Good'}",
            "--out",
            str(out),
            "--no-progress",
            "--no-lpips",
            "--no-figures",
            "--cka",
            str(ckpt),
            "--cka-slices",
            "6",
            "--checkpoint",
            f"Good={ckpt}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "cka" / "cka.json").read_text())
    for part in ("encoder", "decoder"):
        assert (out / "cka" / f"cka_{part}.png").read_bytes()[:4] == b"\x89PNG"
        matrix = np.array(result["matrices"][part])
        assert matrix.shape == (len(result["layers"][part]["pet"]), len(result["layers"][part]["mri"]))
        assert matrix.shape[0] >= 3 and np.all((matrix >= -1e-9) & (matrix <= 1 + 1e-9))
    assert result["examples"] == 6
    report_md = (out / "report.md").read_text()
    assert "(cka/cka_encoder.png)" in report_md and "(cka/cka_decoder.png)" in report_md
    assert "| Good | m2diff demo V6 |" in (out / "complexity.md").read_text()

    single = save_tiny_checkpoint(tmp_path / "v1.pt", {**TINY_M2DIFF, "variant": "V1"})
    code = cli.main(
        [
            "--manifest",
            str(cohort["manifest"]),
            "--pred",
            f"Good={cohort['preds'] / 'Good'}",
            "--out",
            str(tmp_path / "rep2"),
            "--no-progress",
            "--no-lpips",
            "--cka",
            str(single),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "two-branch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rep2").exists()


def test_subset_parsing():
    from m2diff_monai.evaluation.subsets import parse_subsets, subset_members

    assert parse_subsets({"held-out": "heldout-*"}) == (("held-out", ("heldout-*",)),)
    with pytest.raises(InputError, match="reserved"):
        parse_subsets(["all subjects=demo-*"])  # the name of the targets' whole-split group
    assert parse_subsets(["a=x*, y?", "b=z"]) == (("a", ("x*", "y?")), ("b", ("z",)))
    assert subset_members(["x1", "y2", "yy2", "z"], ("x*", "y?")) == ["x1", "y2"]
    for bad, message in ((["a=x", "a=y"], "given twice"), (["=x"], "needs a name"), (["a="], "needs a name")):
        with pytest.raises(InputError, match=message):
            parse_subsets(bad)


def test_method_map_parsing():
    assert inputs.parse_method_map(["A=x", "B=y"], "--pred") == {"A": "x", "B": "y"}
    assert inputs.parse_method_map("A=x,B=y", "--pred") == {"A": "x", "B": "y"}
    assert inputs.parse_method_map({"A": "x"}, "--pred") == {"A": "x"}
    for bad in (["A"], ["A=x", "A=y"], ["SD=x"], ["a b=x"]):
        with pytest.raises(InputError):
            inputs.parse_method_map(bad, "--pred")


def test_bundle_evaluate_config_runs(cohort, tmp_path):
    from monai.bundle import run as bundle_run

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "bundle_report"
    bundle_run(
        "evaluate",
        config_file=str(repo / "bundles" / "m2diff" / "evaluate.json"),
        manifest=str(cohort["manifest"]),
        predictions={"M2Diff": str(cohort["preds"] / "Good")},
        output_dir=str(out),
        lpips=False,
        figures=False,
        progress=False,
        subjects="s01,s03",
    )
    df = pd.read_csv(out / "per_subject.csv")
    # the bundle's default baselines: the Gaussian row (defaults: this manifest has no validation split)
    assert list(df["method"].unique()) == ["LD", "Gaussian", "M2Diff"]
    assert sorted(df["subject"].unique()) == ["s01", "s03"]
    config = json.loads((repo / "bundles" / "mfdiff" / "evaluate.json").read_text())
    assert config["evaluate"]["_target_"] == "m2diff_monai.evaluation.run.run_bundle_evaluation"


@pytest.mark.parametrize("space", ["pet", "mri"])
def test_end_to_end_with_the_pipeline_and_m2diff_infer(tmp_path, space):
    """Real manifest (m2diff-preprocess) and real cohort predictions (m2diff-infer): the names line up, and the
    masks come back onto the LD grid (exactly for space=pet, through ANTs nearest neighbour for space=mri)."""
    from badinputs import write_subject, write_table
    from m2diff_monai.inference import api
    from m2diff_monai.networks.factory import build_network
    from preprocessing.pipeline import PipelineOptions, run_pipeline
    from tiny_networks import IdentityRegressor  # noqa: F401  (registers inference_test_identity)

    raw = tmp_path / "raw"
    rows = [write_subject(raw, "c01", seed=1, flip_lps=True), write_subject(raw, "c02", seed=2)]
    for row in rows:
        row["split"] = "test"
    manifest = tmp_path / "manifests" / "tiny.json"
    run_pipeline(
        write_table(raw / "subjects.csv", rows),
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=SIZE, split=(0.0, 0.0, 1.0), space=space),
    )
    net = build_network({"name": "inference_test_identity"})
    data = {"size": SIZE, "normalization": "shared", "transform": "rigid", "space": space}
    save_checkpoint(tmp_path / "id.pt", net, None, data, iteration=10)
    api.infer_manifest(
        tmp_path / "id.pt",
        manifest,
        tmp_path / "preds",
        split="test",
        fusion="mean",
        steps=2,
        progress=False,
        png=False,
        device="cpu",
    )
    out = tmp_path / "report"
    assert (
        cli.main(
            [
                "--manifest",
                str(manifest),
                "--pred",
                f"Identity={tmp_path / 'preds'}",
                "--out",
                str(out),
                "--no-progress",
                "--no-lpips",
            ]
        )
        == 0
    )
    df = pd.read_csv(out / "per_subject.csv").set_index(["subject", "method"])
    volumes = {v["subject"]: v for v in json.loads(manifest.read_text())["volumes"]}
    for sid in ("c01", "c02"):
        cube_voxels = int((np.asarray(nib.load(manifest.parent / volumes[sid]["brain_mask"]).dataobj) > 0).sum())
        if space == "pet":  # identity model + exact mask placement: the LD row's numbers, voxel for voxel
            assert df.loc[(sid, "LD"), "brain_voxels"] == cube_voxels
            for column in ("psnr", "ssim", "nmse", "bias"):
                assert df.loc[(sid, "Identity"), column] == pytest.approx(df.loc[(sid, "LD"), column], rel=1e-5)
        else:  # T1 grid (1.6 mm) → PET grid (2 mm): the mask keeps its volume within a few percent
            cube_ml = cube_voxels * 1.6**3 / 1000
            assert df.loc[(sid, "LD"), "brain_volume_ml"] == pytest.approx(cube_ml, rel=0.1)
            assert df.loc[(sid, "Identity"), "psnr"] > df.loc[(sid, "LD"), "psnr"] - 1.0
    assert json.loads((out / "complexity.json").read_text())[0]["inference_seconds_per_subject"] > 0


def test_region_metrics_equal_evaluate_volume(cohort):
    """The bounding-box shortcut gives evaluate_volume's region columns exactly (NaN for an empty region)."""
    a = cohort["arrays"]["s02"]
    regions = {r: a[r] for r in REGIONS}
    full = metrics.evaluate_volume(a["good"], a["sd"], a["brain"], regions, orientations=("axial",))
    fast = scoring.region_metrics(a["good"], a["sd"], {r: (m, grid.mask_box(m)) for r, m in regions.items()})
    assert set(fast) == {k for k in full if k.startswith(("bias_", "mean_pred_", "mean_target_"))}
    for key, value in fast.items():
        assert value == pytest.approx(full[key], rel=1e-12, nan_ok=True), key
    assert math.isnan(fast["bias_lesion_hot"])


def test_paper_protocol_columns_tables_and_record(report, cohort):
    """Every row has the papers' protocol columns; s02 (stored LPS) equals the protocol on the canonical arrays,
    so axial = the third RAS+ axis whatever the storage order; the report says which protocol each table uses."""
    out, df = report["out"], report["per_subject"]
    for column in ("psnr_paper", "ssim_paper", "nmse_paper", "lpips_paper", "paper_slices"):
        assert column in df.columns and df[column].notna().sum() >= (6 if column != "lpips_paper" else 0), column
    summary = pd.read_csv(out / "summary.csv")
    assert {"psnr_paper_mean", "ssim_paper_std", "nmse_paper_n", "lpips_paper_mean"} <= set(summary.columns)
    rows = df.set_index(["subject", "method"])
    for sid in ("s01", "s02"):
        a = cohort["arrays"][sid]
        ref = paper_protocol.prepare_reference(a["sd"], (SPACING,) * 3)
        for method, key in (("LD", "ld"), ("Good", "good")):
            expected = paper_protocol.score_volume(a[key], ref)[0]
            for column in ("psnr_paper", "ssim_paper", "nmse_paper"):
                assert rows.loc[(sid, method), column] == pytest.approx(expected[column], rel=1e-6), (sid, column)
        assert rows.loc[(sid, "Good"), "psnr_paper"] > rows.loc[(sid, "Good"), "psnr_2d_axial"] + 10  # padding
    text = (out / "summary.md").read_text()
    assert "## The papers' protocol" in text and "10·log10(N/N_mask)" in text and "not the papers' protocol" in text
    assert "The papers' protocol" in (out / "report.md").read_text()
    record = json.loads((out / "run.json").read_text())["paper_protocol"]
    assert record["scaling"] == "reference" and record["pad_to"] == 256 and record["torchmetrics"]
    assert set(pd.read_csv(out / "ttests.csv")["metric"]) >= {"psnr_paper", "ssim_paper", "nmse_paper"}


def test_paper_protocol_options_reach_the_numbers(cohort, tmp_path, capsys):
    out = tmp_path / "rep"
    args = [
        "--manifest",
        str(cohort["manifest"]),
        "--pred",
        f"Good={cohort['preds'] / 'Good'}",
        "--out",
        str(out),
        "--no-progress",
        "--no-figures",
        "--no-lpips",
        "--subjects",
        "s01",
    ]
    assert cli.main([*args, "--paper-pad", "128", "--paper-scaling", "own", "--paper-min-size", "100"]) == 0
    row = pd.read_csv(out / "per_subject.csv").set_index("method").loc["Good"]
    a = cohort["arrays"]["s01"]
    ref = paper_protocol.prepare_reference(
        a["sd"], (SPACING,) * 3, paper_protocol.PaperOptions(scaling="own", pad_to=128, min_size=100)
    )
    assert row["psnr_paper"] == pytest.approx(paper_protocol.score_volume(a["good"], ref)[0]["psnr_paper"], rel=1e-6)
    assert row["paper_min_size"] == 100
    with pytest.raises(InputError, match="min_size"):
        run.evaluate_cohort(
            cohort["manifest"],
            {"Good": cohort["preds"] / "Good"},
            tmp_path / "bad",
            paper_min_size=0,
            lpips=False,
            figures=False,
            progress=False,
        )
