"""benchmarks/gpu_suite.sh parses, and every flag its commands pass exists in the script it calls (--dry-run)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _dry_run(device: str) -> list[list[str]]:
    env = {**os.environ, "DEVICE": device, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(SUITE), "--dry-run"], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    ).stdout
    return [line[2:].split() for line in out.splitlines() if line.startswith("+ ")]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_commands_use_real_flags():
    # one test for both modes so each script's --help (a torch import) runs once
    helps: dict[str, str] = {}
    for device in ("cuda", "cpu"):
        _check_flags(_dry_run(device), device, helps)


def _check_flags(commands: list[list[str]], device: str, helps: dict[str, str]) -> None:
    targets = [cmd[1:3] if cmd[1] == "-m" else cmd[1:2] for cmd in commands if cmd[1] != "-"]
    assert {" ".join(t) for t in targets} == {
        "benchmarks/bench_training.py",
        "benchmarks/bench_inference.py",
        "-m m2diff_monai.inference.cli",
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for cmd in commands:
        if cmd[1] == "-":
            continue
        target = cmd[1:3] if cmd[1] == "-m" else cmd[1:2]
        key = " ".join(target)
        if key not in helps:
            helps[key] = subprocess.run(
                [sys.executable, *target, "--help"], capture_output=True, text=True, env=env, cwd=ROOT, check=True
            ).stdout
        for flag in (tok.split("=")[0] for tok in cmd if tok.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", helps[key]), f"{key} has no {flag}"
    assert any("--compile" in cmd for cmd in commands) == (device == "cuda")
    assert any("paper-256" in cmd for cmd in commands) == (device == "cuda")
