"""Cohort inference split over job-array shards and torchrun ranks gives the predictions of one unsharded run.

A tiny random M2Diff with the stochastic ancestral sampler: every prediction depends on the sampling noise, so a
subject seeded differently in a shard (or by a rank) than in the whole run would change its voxels.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from badinputs import write_subject, write_table
from inference_checkpoints import CUBE, tiny_m2diff_checkpoint
from m2diff_monai.errors import InputError
from m2diff_monai.inference import api
from m2diff_monai.inference.cli import main
from m2diff_monai.inference.cohort import Shard, merge_shards, resolve_shard

ROOT = Path(__file__).resolve().parents[1]
REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "sampler": "ancestral",
    "steps": 2,
    "batch_size": 64,
    "progress": False,
    "png": False,
    "device": "cpu",
    "amp": "none",
    "orientations": "axial,coronal",
    "fusion": "mean",
    "seed": 3,
}
SUBJECTS = ("a03", "a01", "a02")  # listed unsorted: shards sort by id, the merged list keeps the unsharded order


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    from preprocessing.pipeline import PipelineOptions, run_pipeline

    root = tmp_path_factory.mktemp("shards")
    rows = [write_subject(root / "raw", sid, seed=i, with_mri=False) for i, sid in enumerate(SUBJECTS)]
    for row in rows:
        row["split"] = "test"
    manifest = root / "m.json"
    run_pipeline(
        write_table(root / "raw" / "subjects.csv", rows),
        root / "prep",
        manifest,
        PipelineOptions(transform="rigid", size=CUBE, split=(0.0, 0.0, 1.0)),
    )
    checkpoint = tiny_m2diff_checkpoint(root / "tiny.pt")
    whole = root / "whole"
    api.infer_manifest(checkpoint, manifest, whole, split="test", **SETTINGS)
    return {"manifest": manifest, "checkpoint": checkpoint, "whole": whole, "root": root}


def _volumes(folder: Path) -> dict[str, np.ndarray]:
    return {sid: np.asarray(nib.load(folder / f"{sid}.nii.gz").dataobj) for sid in SUBJECTS}


def _assert_same_predictions(folder: Path, whole: Path) -> None:
    got, want = _volumes(folder), _volumes(whole)
    for sid in SUBJECTS:
        assert np.array_equal(got[sid], want[sid]), sid
    merged = json.loads((folder / "predictions.json").read_text())
    reference = json.loads((whole / "predictions.json").read_text())
    assert [s["subject"] for s in merged["subjects"]] == [s["subject"] for s in reference["subjects"]]
    assert [s["sampled_slices"] for s in merged["subjects"]] == [s["sampled_slices"] for s in reference["subjects"]]


def test_shard_selection_is_a_partition_of_the_sorted_ids():
    items = [{"subject": s} for s in ("c", "a", "e", "b", "d")]
    shares = [[it["subject"] for it in Shard(i, 3).select(items)] for i in (1, 2, 3)]
    assert shares == [["a", "d"], ["b", "e"], ["c"]]
    assert resolve_shard("2/3") == Shard(2, 3) and resolve_shard(None).whole
    with pytest.raises(InputError, match="1 <= I <= N"):
        resolve_shard("4/3")


def test_two_shards_then_merge_equal_one_run(cohort, tmp_path, capsys):
    out = tmp_path / "sharded"
    first = api.infer_manifest(cohort["checkpoint"], cohort["manifest"], out, split="test", shard="1/2", **SETTINGS)
    assert [s["subject"] for s in first["subjects"]] == ["a01", "a03"]  # sorted ids at positions 0 and 2
    assert not (out / "predictions.json").exists()
    with pytest.raises(InputError, match="shard\\(s\\) 2/2 have no summary"):
        merge_shards(out)
    code = main(
        [
            "--checkpoint",
            str(cohort["checkpoint"]),
            "--manifest",
            str(cohort["manifest"]),
            "--out-dir",
            str(out),
            "--shard",
            "2/2",
            "--steps",
            "2",
            "--sampler",
            "ancestral",
            "--batch-size",
            "64",
            "--device",
            "cpu",
            "--amp",
            "none",
            "--orientations",
            "axial,coronal",
            "--fusion",
            "mean",
            "--seed",
            "3",
            "--no-png",
            "--no-progress",
        ]
    )
    assert code == 0 and "predictions.shard-2-of-2.json" in capsys.readouterr().out
    assert main(["merge", "--out-dir", str(out)]) == 0
    _assert_same_predictions(out, cohort["whole"])
    merged = json.loads((out / "predictions.json").read_text())
    assert [s["shard"] for s in merged["shards"]] == ["1/2", "2/2"]


def test_merge_refuses_disagreeing_or_incomplete_shards(cohort, tmp_path, capsys):
    out = tmp_path / "odd"
    api.infer_manifest(cohort["checkpoint"], cohort["manifest"], out, split="test", shard="1/2", **SETTINGS)
    api.infer_manifest(
        cohort["checkpoint"], cohort["manifest"], out, split="test", shard="2/2", **{**SETTINGS, "seed": 4}
    )
    with pytest.raises(InputError, match="shard 2/2 disagrees with shard 1/2 on settings.seed"):
        merge_shards(out)
    assert main(["merge", "--out-dir", str(out)]) == 2
    assert "settings.seed" in capsys.readouterr().err and not (out / "predictions.json").exists()

    second = out / "predictions.shard-2-of-2.json"
    summary = json.loads(second.read_text())
    summary["settings"]["seed"] = 3
    summary["subjects"] = []  # a2's prediction lost
    second.write_text(json.dumps(summary))
    with pytest.raises(InputError, match="missing subject\\(s\\) a02"):
        merge_shards(out)
    summary["checkpoint_fingerprint"] = {"path": "x", "size": 1, "sha256": "0"}
    second.write_text(json.dumps(summary))
    with pytest.raises(InputError, match="checkpoint_fingerprint"):
        merge_shards(out)
    shutil.copy(second, out / "predictions.shard-1-of-3.json")
    with pytest.raises(InputError, match="different shard counts"):
        merge_shards(out)
    assert not (out / "predictions.json").exists()


def test_a_shard_without_subjects_still_writes_its_summary(cohort, tmp_path):
    out = tmp_path / "wide"
    summary = api.infer_manifest(cohort["checkpoint"], cohort["manifest"], out, split="test", shard="4/4", **SETTINGS)
    assert summary["subjects"] == [] and sorted(summary["selected"]) == sorted(SUBJECTS)
    assert json.loads((out / "predictions.shard-4-of-4.json").read_text())["shard"] == "4/4"
    with pytest.raises(InputError, match="shard\\(s\\) 1/4, 2/4, 3/4 have no summary"):
        merge_shards(out)


def test_shard_refused_in_single_subject_mode_and_under_torchrun(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["--checkpoint", "x.pt", "--ld-pet", "a.nii.gz", "--out", str(tmp_path / "p.nii.gz"), "--shard", "1/2"])
    assert "--shard is for cohort mode" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_shard(None) == Shard(2, 2, distributed=True, local_rank=1)
    with pytest.raises(InputError, match="--shard is for job arrays"):
        resolve_shard("1/2")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_run(cohort, tmp_path):
    out = tmp_path / "ranks"
    command = [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "m2diff_monai.inference.cli",
        "--checkpoint",
        str(cohort["checkpoint"]),
        "--manifest",
        str(cohort["manifest"]),
        "--out-dir",
        str(out),
        "--steps",
        "2",
        "--sampler",
        "ancestral",
        "--batch-size",
        "64",
        "--device",
        "auto",
        "--amp",
        "none",
        "--orientations",
        "axial,coronal",
        "--fusion",
        "mean",
        "--seed",
        "3",
        "--no-png",
        "--no-progress",
        "--threads",
        "1",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _assert_same_predictions(out, cohort["whole"])
    merged = json.loads((out / "predictions.json").read_text())
    assert merged["settings"]["device"] == "cpu" and len(merged["shards"]) == 2
    assert result.stdout.count("3 subject(s)") == 1  # rank 0 reports the merged cohort, rank 1 stays quiet


def test_bundle_config_shards_then_merge_equal_one_run(cohort, tmp_path):
    """`python -m monai.bundle run --config_file bundles/m2diff/inference.json --shard I/N ...` as a job array:
    the bundle's own config, parsed as MONAI parses it, with only the command-line ids overridden."""
    from monai.bundle import ConfigParser

    out = tmp_path / "bundle-sharded"
    for index in (1, 2):
        parser = ConfigParser()
        parser.read_config(REPO / "bundles" / "m2diff" / "inference.json")
        overrides = {
            "checkpoint": str(cohort["checkpoint"]),
            "manifest": str(cohort["manifest"]),
            "out_dir": str(out),
            "shard": f"{index}/2",
            **SETTINGS,
        }
        for key, value in overrides.items():
            parser[key] = value
        parser.get_parsed_content("inference", lazy=False)
    assert main(["merge", "--out-dir", str(out)]) == 0
    _assert_same_predictions(out, cohort["whole"])


def test_bundle_shard_without_a_cohort_is_one_line(tmp_path):
    with pytest.raises(InputError, match="shard splits a cohort"):
        api.run_bundle_inference(
            tmp_path / "x.pt", ld_pet=tmp_path / "a.nii.gz", output=tmp_path / "o.nii.gz", shard="1/2"
        )
