"""``m2diff-infer`` and the bundles' ``inference.json`` end to end: tiny models, tiny synthetic subjects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinputs import write_subject, write_table
from inference_checkpoints import CUBE, identity_checkpoint, tiny_m2diff_checkpoint
from m2diff_monai.inference.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
FAST_ARGS = ["--steps", "2", "--batch-size", "64", "--device", "cpu", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli_subject")
    cells = write_subject(root, "s01", seed=7, flip_lps=True)
    return {k: root / v for k, v in cells.items() if k in ("ld_pet", "mri")}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return tiny_m2diff_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "m2diff_monai.inference.cli", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--samples" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_end_to_end_with_tiny_model(tmp_path, subject, tiny_checkpoint):
    out = tmp_path / "out" / "pred.nii.gz"
    proc = _infer(
        "--bundle",
        "bundles/m2diff",
        "--checkpoint",
        str(tiny_checkpoint),
        "--ld-pet",
        str(subject["ld_pet"]),
        "--mri",
        str(subject["mri"]),
        "--out",
        str(out),
        "--summary",
        str(tmp_path / "run.json"),
        *FAST_ARGS,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run.json").read_text())["threads"] == {"threads": 1, "source": "--threads"}
    raw, pred = nib.load(subject["ld_pet"]), nib.load(out)
    assert pred.shape == raw.shape and np.allclose(pred.affine, raw.affine)
    assert np.isfinite(np.asarray(pred.dataobj)).all()
    assert (out.parent / "pred.png").is_file()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["files"]["prediction"] == str(out)


def test_cli_bad_input_one_line_and_nothing_written(tmp_path, subject, tiny_checkpoint):
    truncated = tmp_path / "ld_truncated.nii.gz"
    data = subject["ld_pet"].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out" / "pred.nii.gz"
    proc = _infer("--checkpoint", str(tiny_checkpoint), "--ld-pet", str(truncated), "--out", str(out), *FAST_ARGS)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(truncated) in lines[0] and "truncated" in lines[0]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_cli_bad_checkpoint_and_bad_output_name(tmp_path, subject, capsys):
    out = tmp_path / "pred.nii.gz"
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "missing.pt"),
                "--ld-pet",
                str(subject["ld_pet"]),
                "--out",
                str(out),
                *FAST_ARGS,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pt" in err[0] and "does not exist" in err[0]
    ckpt = identity_checkpoint(tmp_path / "id.pt")
    assert (
        main(
            [
                "--checkpoint",
                str(ckpt),
                "--ld-pet",
                str(subject["ld_pet"]),
                "--out",
                str(tmp_path / "p.png"),
                *FAST_ARGS,
            ]
        )
        == 2
    )
    assert ".nii.gz" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:stripe filter")
def test_cli_cohort_mode(tmp_path):
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    raw = tmp_path / "raw"
    rows = [write_subject(raw, "k01", seed=3), write_subject(raw, "k02", seed=4, rotation_deg=12.0)]
    for row in rows:
        row["split"] = "test"
    manifest = tmp_path / "m.json"
    run_pipeline(
        write_table(raw / "subjects.csv", rows),
        tmp_path / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=CUBE, split=(0.0, 0.0, 1.0)),
    )
    out_dir = tmp_path / "preds"
    code = main(
        [
            "--bundle",
            str(ROOT / "bundles" / "m2diff"),
            "--checkpoint",
            str(identity_checkpoint(tmp_path / "id.pt")),
            "--manifest",
            str(manifest),
            "--split",
            "test",
            "--out-dir",
            str(out_dir),
            "--samples",
            "2",
            *FAST_ARGS,
        ]
    )
    assert code == 0
    for row in rows:
        source = nib.load(raw / row["ld_pet"])
        for name in (f"{row['subject_id']}.nii.gz", f"{row['subject_id']}_std.nii.gz"):
            img = nib.load(out_dir / name)
            assert img.shape == source.shape and np.allclose(img.affine, source.affine)
        # a deterministic regressor: every draw is the same, so the uncertainty is exactly 0
        assert not np.asarray(nib.load(out_dir / f"{row['subject_id']}_std.nii.gz").dataobj).any()
        assert (out_dir / f"{row['subject_id']}.png").is_file()
    assert len(json.loads((out_dir / "predictions.json").read_text())["subjects"]) == 2


@pytest.mark.slow
def test_monai_bundle_run_inference(tmp_path, subject, tiny_checkpoint):
    out = tmp_path / "bundle_pred.nii.gz"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inference",
        "--config_file",
        "bundles/m2diff/inference.json",
        "--checkpoint",
        str(tiny_checkpoint),
        "--ld_pet",
        str(subject["ld_pet"]),
        "--output",
        str(out),
        "--steps",
        "2",
        "--batch_size",
        "64",
        "--device",
        "cpu",
        "--progress",
        "False",
        "--no_mri",
        "True",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert nib.load(out).shape == nib.load(subject["ld_pet"]).shape
