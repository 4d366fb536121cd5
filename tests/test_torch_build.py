"""scripts/torch_build.py: which torch build scripts/setup_env.sh installs (CPU without an NVIDIA GPU, CUDA with
one, the venv's own when it has torch), decided without installing anything: a fake ``nvidia-smi`` on PATH,
fake wheels in a find-links folder, and a CPU index address that refuses connections."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "torch_build.py"
SPEC = ">=2.4,<=2.14.1"
REFUSED_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, the connection is refused at once

_spec = importlib.util.spec_from_file_location("torch_build", SCRIPT)
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)

PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
PLATFORM = f"manylinux_2_28_{platform.machine().lower()}"


def _wheel(folder: Path, version: str, python: str = PY_TAG, plat: str = PLATFORM) -> None:
    (folder / f"torch-{version}-{python}-{python}-{plat}.whl").write_bytes(b"")


def _no_network(url):
    raise AssertionError(f"the network was asked ({url}) although no CPU build was wanted")


def _fake_nvidia_smi(folder: Path, stdout: str, code: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    (folder / "nvidia-smi.out").write_text(stdout + "\n")
    exe.write_text(f'#!/bin/sh\n/bin/cat "$0.out"\nexit {code}\n')
    exe.chmod(0o755)
    return folder


@pytest.mark.parametrize(
    ("version", "spec", "ok"),
    [
        ("2.13.0+cpu", SPEC, True),
        ("2.14.1", SPEC, True),
        ("2.14.2", SPEC, False),
        ("2.3.1", SPEC, False),
        ("2.4", SPEC, True),
        ("2.10.0+cpu", ">=2.9", True),
        ("2.9.0", "==2.9", True),
        ("2.9.1", "!=2.9.1", False),
    ],
)
def test_version_ranges(version, spec, ok):
    assert tb.satisfies(version, spec) is ok


def test_local_cpu_wheels_this_python_and_machine_in_range_newest_first(tmp_path):
    _wheel(tmp_path, "2.13.0+cpu")
    _wheel(tmp_path, "2.10.0+cpu")
    _wheel(tmp_path, "2.14.1")  # a CUDA (default) build
    _wheel(tmp_path, "2.15.0+cpu")  # above the project's range
    _wheel(tmp_path, "2.12.0+cpu", python="cp39")
    _wheel(tmp_path, "2.11.0+cpu", plat="win_amd64" if platform.machine().lower() != "win_amd64" else "macosx")
    assert tb.local_cpu_wheels([str(tmp_path), f"file://{tmp_path}", str(tmp_path / "nope")], SPEC) == [
        "2.13.0+cpu",
        "2.10.0+cpu",
    ]


@pytest.mark.skipif(platform.system() == "Darwin", reason="macOS: pip's default torch is already the CPU build")
def test_auto_without_gpu_prefers_the_cpu_index_then_a_local_wheel_then_says_it_falls_back(tmp_path):
    no_gpu = (False, "nvidia-smi not found")
    mode, reason, args = tb.choose(
        "auto",
        SPEC,
        has_torch=None,
        gpu=no_gpu,
        cpu_index="https://cpu.example/whl",
        index_ok=lambda url: True,
        find_links=lambda: [str(tmp_path)],
    )
    assert (mode, args) == ("cpu", ["--index-url", "https://cpu.example/whl", f"torch{SPEC}"])
    assert "no NVIDIA GPU (nvidia-smi not found)" in reason
    _wheel(tmp_path, "2.13.0+cpu")
    mode, reason, args = tb.choose(
        "auto",
        SPEC,
        has_torch=None,
        gpu=no_gpu,
        cpu_index="https://cpu.example/whl",
        index_ok=lambda url: False,
        find_links=lambda: [str(tmp_path)],
    )
    assert (mode, args) == ("cpu", ["torch==2.13.0+cpu"]) and "unreachable" in reason
    mode, reason, args = tb.choose(
        "cpu",
        SPEC,
        has_torch=None,
        gpu=no_gpu,
        cpu_index="https://cpu.example/whl",
        index_ok=lambda url: False,
        find_links=list,
    )
    assert (mode, args) == ("cuda", [f"torch{SPEC}"]) and "no CPU build reachable" in reason


def test_gpu_or_an_existing_torch_never_asks_the_network():
    gpu = (True, "GPU 0: NVIDIA H200")
    assert tb.choose(
        "auto", SPEC, has_torch=None, gpu=gpu, cpu_index="x", index_ok=_no_network, find_links=_no_network
    )[::2] == ("cuda", [f"torch{SPEC}"])
    mode, reason, args = tb.choose(
        "auto",
        SPEC,
        has_torch="2.14.1",
        gpu=(False, "none"),
        cpu_index="x",
        index_ok=_no_network,
        find_links=_no_network,
    )
    assert (mode, args) == ("keep", []) and "2.14.1" in reason
    assert tb.choose(
        "keep", SPEC, has_torch=None, gpu=gpu, cpu_index="x", index_ok=_no_network, find_links=_no_network
    )[::2] == ("keep", [])
    with pytest.raises(ValueError, match="M2DIFF_TORCH must be one of"):
        tb.choose("gpu", SPEC, has_torch=None, gpu=gpu, cpu_index="x", index_ok=_no_network, find_links=_no_network)


def test_nvidia_smi_decides(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert tb.nvidia_gpu() == (False, "nvidia-smi not found")
    ok = _fake_nvidia_smi(tmp_path / "gpu", "GPU 0: NVIDIA H200 (UUID: GPU-1234)", 0)
    monkeypatch.setenv("PATH", str(ok))
    assert tb.nvidia_gpu() == (True, "GPU 0: NVIDIA H200 (UUID: GPU-1234)")
    broken = _fake_nvidia_smi(
        tmp_path / "nodriver", "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", 9
    )
    monkeypatch.setenv("PATH", str(broken))
    found, why = tb.nvidia_gpu()
    assert not found and why.startswith("nvidia-smi lists no GPU (exit 9: NVIDIA-SMI has failed")


def _run_as_setup_env_does(tmp_path: Path, gpu: bool, **env) -> list[str]:
    """scripts/setup_env.sh's ``eval`` of the script's output in bash; returns mode, reason and the pip arguments.
    ``python -S``: no site-packages, so the interpreter looks like a new venv without torch."""
    fake = _fake_nvidia_smi(tmp_path / "bin", "GPU 0: Tesla T4" if gpu else "No devices were found", 0 if gpu else 6)
    env = {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "PIP_CONFIG_FILE": os.devnull,
        "M2DIFF_TORCH_CPU_INDEX": REFUSED_INDEX,
        "HOME": str(tmp_path),
        **env,
    }
    shell = (
        f'eval "$({sys.executable} -S {SCRIPT} --spec "{SPEC}")" && printf "%s\\n" "$M2DIFF_TORCH_MODE" '
        '"$M2DIFF_TORCH_REASON" "${M2DIFF_TORCH_PIP_ARGS[@]}"'
    )
    done = subprocess.run(["bash", "-c", shell], check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(platform.system() == "Darwin", reason="macOS: pip's default torch is already the CPU build")
def test_script_output_drives_setup_env(tmp_path):
    mode, reason, *args = _run_as_setup_env_does(tmp_path, gpu=True)
    assert (mode, args) == ("cuda", [f"torch{SPEC}"]) and "NVIDIA GPU found (GPU 0: Tesla T4)" in reason
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "2.13.0+cpu")
    mode, reason, *args = _run_as_setup_env_does(tmp_path, gpu=False, PIP_FIND_LINKS=str(wheels))
    assert (mode, args) == ("cpu", ["torch==2.13.0+cpu"])
    assert "nvidia-smi lists no GPU (exit 6: No devices were found)" in reason and REFUSED_INDEX in reason
    mode, reason, *args = _run_as_setup_env_does(tmp_path, gpu=True, M2DIFF_TORCH="cpu", PIP_FIND_LINKS=str(wheels))
    assert (mode, args) == ("cpu", ["torch==2.13.0+cpu"]) and reason.startswith("M2DIFF_TORCH=cpu")
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPT), "--spec", SPEC],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "M2DIFF_TORCH": "gpu"},
        timeout=60,
    )
    assert done.returncode == 2 and "M2DIFF_TORCH must be one of auto, cpu, cuda, keep" in done.stderr
