"""Thread count on shared nodes (m2diff_monai.runtime) and one-line errors of bundle runs (m2diff_monai.bundle_run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from m2diff_monai import bundle_run, runtime
from m2diff_monai.errors import InputError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def node(monkeypatch, tmp_path):
    """A fake node: no cgroup files, no thread variables, 8 CPUs of affinity (each test adds what it needs)."""
    for variable in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(runtime, "CGROUP_V2_CPU_MAX", tmp_path / "v2" / "cpu.max")
    monkeypatch.setattr(runtime, "CGROUP_V1_QUOTA", tmp_path / "v1" / "cpu.cfs_quota_us")
    monkeypatch.setattr(runtime, "CGROUP_V1_PERIOD", tmp_path / "v1" / "cpu.cfs_period_us")
    monkeypatch.setattr(runtime, "affinity_cpus", lambda: 8)
    return tmp_path


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_affinity_is_the_fallback(node):
    assert runtime.allowed_threads() == (8, "CPU affinity")


def test_omp_num_threads_wins_over_quota_and_slurm(node, monkeypatch):
    write(node / "v2" / "cpu.max", "200000 100000\n")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.allowed_threads() == (3, "OMP_NUM_THREADS")


def test_cgroup_v2_quota_rounds_up_and_wins_over_slurm(node, monkeypatch):
    write(node / "v2" / "cpu.max", "150000 100000\n")  # 1.5 CPUs → 2 threads
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert runtime.allowed_threads() == (2, "cgroup CPU quota")


def test_cgroup_v2_without_quota_falls_through_to_slurm(node, monkeypatch):
    write(node / "v2" / "cpu.max", "max 100000\n")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "5")
    assert runtime.allowed_threads() == (5, "SLURM_CPUS_PER_TASK")


def test_cgroup_v1_quota(node):
    write(node / "v1" / "cpu.cfs_quota_us", "300000\n")
    write(node / "v1" / "cpu.cfs_period_us", "100000\n")
    assert runtime.allowed_threads() == (3, "cgroup CPU quota")
    write(node / "v1" / "cpu.cfs_quota_us", "-1\n")  # no quota
    assert runtime.allowed_threads() == (8, "CPU affinity")


@pytest.mark.parametrize(
    "variable, value, source",
    [("OMP_NUM_THREADS", "64", "OMP_NUM_THREADS"), ("SLURM_CPUS_PER_TASK", "32", "SLURM_CPUS_PER_TASK")],
)
def test_never_above_affinity(node, monkeypatch, variable, value, source):
    monkeypatch.setenv(variable, value)
    assert runtime.allowed_threads() == (8, source)
    write(node / "v2" / "cpu.max", "1600000 100000\n")  # a 16-CPU quota on an 8-CPU affinity
    monkeypatch.delenv(variable)
    assert runtime.allowed_threads() == (8, "cgroup CPU quota")


def test_invalid_values_are_ignored(node, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "lots")
    write(node / "v2" / "cpu.max", "garbage\n")
    assert runtime.allowed_threads() == (8, "CPU affinity")


def test_itk_gets_one_thread_unless_the_user_chose(node, monkeypatch):
    """ITK's pool is one thread (reproducible registration) even when torch gets two; a value the user set stays."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    runtime.reset_for_tests()
    try:
        assert runtime.configure_threads()["threads"] == min(2, runtime.affinity_cpus())
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
        monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "4")
        runtime.reset_for_tests()
        runtime.configure_threads()
        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "4"
    finally:
        runtime.reset_for_tests()
        torch.set_num_threads(before)


def test_loading_ants_gives_itk_one_thread_without_any_cli(monkeypatch):
    """The Python API (e.g. ``preprocessing.registration.register`` in a notebook) gets the CLIs' default: the one
    function every ANTs call goes through sets it, and leaves a value the user chose alone."""
    from m2diff_monai.data import grid

    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    grid._ants()
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "3")
    grid._ants()
    assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "3"


def test_configure_threads_applies_once_and_sets_itk(node, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", raising=False)
    runtime.reset_for_tests()
    try:
        assert runtime.configure_threads() == {"threads": 1, "source": "OMP_NUM_THREADS"}
        assert torch.get_num_threads() == 1 and os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert runtime.configure_threads()["threads"] == 1  # idempotent: the first decision stands
    finally:
        runtime.reset_for_tests()
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- bundle errors
def test_summary_line_finds_our_error_under_monai_wrapper():
    try:
        try:
            raise InputError("manifest not found; create it with: X", path="data_manifests/x.json")
        except InputError as err:
            raise RuntimeError("Failed to instantiate component 'load_slice_items'") from err
    except RuntimeError as wrapped:
        line = bundle_run.summary_line(wrapped)
    assert line.startswith("error: file data_manifests/x.json: manifest not found; create it with: X")
    assert "M2DIFF_DEBUG=1" in line and "\n" not in line


def test_summary_line_value_error_and_internal_error():
    try:
        try:
            raise ValueError("steps must be >= 1 or 'all', got 0")
        except ValueError:
            raise RuntimeError("Failed to instantiate component 'x'")  # noqa: B904 (tests the implicit __context__)
    except RuntimeError as wrapped:
        assert bundle_run.summary_line(wrapped).startswith("error: steps must be >= 1")
    assert bundle_run.summary_line(KeyError("k")).startswith("internal error: KeyError: 'k'")


def run_bundle(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bundle_run_missing_manifest_ends_in_one_line(tmp_path):
    result = run_bundle(
        [
            "training",
            "--config_file",
            str([str(REPO / "bundles/m2diff/train.json"), str(REPO / "bundles/m2diff/demo.json")]),
            "--manifest_file",
            str(tmp_path / "missing.json"),
            "--output_dir",
            str(tmp_path / "run"),
        ],
        tmp_path,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: file {tmp_path / 'missing.json'}: manifest not found")
    assert "m2diff-preprocess demo --out work/demo --downsample 2 --size 64" in lines[-1]
    assert "Traceback" not in result.stderr and "Failed to instantiate" not in result.stderr
    assert "using 1 CPU thread(s) (OMP_NUM_THREADS)" in result.stderr + result.stdout


def test_bundle_run_bad_steps_and_debug_traceback(tmp_path):
    from test_export import TINY_V6, write_checkpoint

    # a real checkpoint: the bundle's ``model`` loads it before the entry point checks the settings
    checkpoint = write_checkpoint(tmp_path / "tiny.pt", TINY_V6)
    args = [
        "inference",
        "--config_file",
        str(REPO / "bundles/m2diff/inference.json"),
        "--steps",
        "0",
        "--checkpoint",
        str(checkpoint),
        "--ld_pet",
        str(tmp_path / "x.nii.gz"),
        "--output",
        str(tmp_path / "out.nii.gz"),
    ]
    result = run_bundle(args, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: inference settings: steps must be >= 1")
    assert "Traceback" not in result.stderr
    debug = run_bundle(args, tmp_path, M2DIFF_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "Failed to instantiate" in debug.stderr


def test_exported_bundle_run_elsewhere_names_bundle_root(tmp_path):
    from m2diff_monai.export.bundle import load_exported_model

    with pytest.raises(InputError, match="--bundle_root EXPORTED_DIR"):
        load_exported_model(torch.nn.Identity(), "./models/model.pt", {})


def test_report_outputs_prints_where_results_went(capsys, tmp_path):
    single = {"files": {"prediction": "/o/pred.nii.gz", "png": "/o/pred.png"}, "warnings": ["w"]}
    assert bundle_run.report_outputs(single) is single
    cohort = {"subjects": [{"subject": "s1", "files": {"prediction": str(tmp_path / "s1.nii.gz")}}]}
    bundle_run.report_outputs(cohort, tmp_path)
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "wrote /o/pred.nii.gz (also: /o/pred.png)",
        f"s1: {tmp_path / 's1.nii.gz'}",
        f"1 subject(s) written; list: {tmp_path / 'predictions.json'}",
    ]
    assert err.strip() == "warning: w"


def test_bad_steps_text_is_named():
    from m2diff_monai.inference.api import InferenceSettings

    with pytest.raises(ValueError, match="steps must be a whole number >= 1 or 'all', got 'abc'"):
        InferenceSettings(steps="abc")
    assert InferenceSettings(steps="12").steps == 12 and InferenceSettings(steps="all").steps is None
