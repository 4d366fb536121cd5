"""Which torch build ``scripts/setup_env.sh`` installs, and from where (standard library only: it runs in a
new virtual environment before anything is installed).

Why: pip's default torch on Linux x86_64 is a CUDA build (5.3 GB in the venv with its NVIDIA libraries and
triton); a machine without an NVIDIA GPU needs only the CPU build (0.75 GB). ``M2DIFF_TORCH`` chooses:

- ``auto`` (default): ``keep`` when the venv already has torch (never swap gigabytes behind the user's back),
  else ``cuda`` when ``nvidia-smi -L`` lists a GPU, else ``cpu``;
- ``cpu``: a CPU build — from PyTorch's CPU index (``M2DIFF_TORCH_CPU_INDEX``) when it answers, else a
  ``torch-*+cpu`` wheel lying in one of pip's ``find-links`` folders, else pip's default (said loudly);
- ``cuda``: pip's default torch (PyPI's Linux x86_64 wheels are CUDA builds);
- ``keep``: install no torch first; the project's install keeps whatever torch the venv has.

Prints shell assignments for ``eval``: ``M2DIFF_TORCH_MODE``, ``M2DIFF_TORCH_REASON`` and
``M2DIFF_TORCH_PIP_ARGS`` (a bash array: the arguments of ``pip install`` for torch; empty: install no torch
first).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

DEFAULT_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MODES = ("auto", "cpu", "cuda", "keep")
_WHEEL = re.compile(r"^torch-(?P<version>[^-]+)-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$")


def nvidia_gpu(timeout: float = 20.0) -> tuple[bool, str]:
    """(True, what nvidia-smi listed) when ``nvidia-smi -L`` runs and lists a GPU; else (False, why not)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False, "nvidia-smi not found"
    try:
        done = subprocess.run([exe, "-L"], check=False, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"nvidia-smi failed: {err}"
    gpus = [line.strip() for line in done.stdout.splitlines() if line.strip().startswith("GPU ")]
    if done.returncode != 0 or not gpus:
        detail = (done.stderr or done.stdout).strip().splitlines()
        return False, f"nvidia-smi lists no GPU (exit {done.returncode}{': ' + detail[0] if detail else ''})"
    return True, gpus[0] if len(gpus) == 1 else f"{len(gpus)} GPUs, {gpus[0]}"


def installed_torch() -> str | None:
    """Version of the torch this interpreter's environment has (read from metadata, without importing it)."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``2.13.0+cpu`` → (2, 13, 0): the release part only (what the project's range compares)."""
    numbers = re.match(r"^\d+(?:\.\d+)*", version)
    return tuple(int(n) for n in numbers.group(0).split(".")) if numbers else ()


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets a comma-separated range such as ``>=2.4,<=2.14.1`` (release parts only)."""
    have = _release(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, bound = re.match(r"^(==|!=|>=|<=|>|<)\s*(.+)$", clause).groups()
        want = _release(bound)
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {"==": a == b, "!=": a != b, ">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b}[op]
        if not ok:
            return False
    return True


def local_cpu_wheels(folders: list[str], spec: str) -> list[str]:
    """Versions (``2.13.0+cpu``) of CPU torch wheels in ``folders`` that this Python and machine can install
    and that meet ``spec``, newest first."""
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    machine = platform.machine().lower()
    found = set()
    for folder in folders:
        path = Path(folder.removeprefix("file://"))
        if not path.is_dir():
            continue
        for wheel in path.glob("torch-*.whl"):
            parts = _WHEEL.match(wheel.name)
            if (
                parts
                and parts["version"].endswith("+cpu")
                and parts["python"] == python_tag
                and machine in parts["platform"].lower()
                and satisfies(parts["version"], spec)
            ):
                found.add(parts["version"])
    return sorted(found, key=_release, reverse=True)


def pip_find_links() -> list[str]:
    """The ``find-links`` folders of pip's configuration (files and ``PIP_FIND_LINKS``), as pip reports them."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], check=False, capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    folders = []
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.endswith("find-links"):
            folders += shlex.split(value.strip().strip("'\""))
    folders += shlex.split(os.environ.get("PIP_FIND_LINKS", ""))
    return list(dict.fromkeys(folders))


def index_answers(url: str, timeout: float = 8.0) -> bool:
    """Whether the package index at ``url`` serves a torch page (a closed network fails in about a second)."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/torch/", timeout=timeout) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def choose(
    mode: str, spec: str, *, has_torch: str | None, gpu: tuple[bool, str], cpu_index: str, index_ok, find_links
) -> tuple[str, str, list[str]]:
    """(mode, reason, pip arguments for torch). ``index_ok`` and ``find_links`` are called only when a CPU
    build is wanted, so choosing ``cuda`` or ``keep`` never touches the network."""
    if mode not in MODES:
        raise ValueError(f"M2DIFF_TORCH must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        if has_torch:
            return (
                "keep",
                (
                    f"the venv already has torch {has_torch} (to switch, recreate the venv with "
                    "M2DIFF_TORCH=cpu or cuda)"
                ),
                [],
            )
        mode, why = ("cuda", f"NVIDIA GPU found ({gpu[1]})") if gpu[0] else ("cpu", f"no NVIDIA GPU ({gpu[1]})")
    else:
        why = f"M2DIFF_TORCH={mode}"
    if mode == "keep":
        return "keep", why + (f"; the venv has torch {has_torch}" if has_torch else "; pip takes its default"), []
    if mode == "cuda":
        return "cuda", why + "; pip's default torch (a CUDA build on Linux x86_64)", [f"torch{spec}"]
    if platform.system() == "Darwin":
        return "cpu", why + "; pip's default torch is the CPU/MPS build on macOS", [f"torch{spec}"]
    if index_ok(cpu_index):
        return "cpu", why + f"; CPU build from {cpu_index}", ["--index-url", cpu_index, f"torch{spec}"]
    wheels = local_cpu_wheels(find_links(), spec)
    if wheels:
        return (
            "cpu",
            why + f"; {cpu_index} unreachable, local CPU wheel torch {wheels[0]} (pip find-links)",
            [f"torch=={wheels[0]}"],
        )
    return (
        "cuda",
        (
            why + f"; but no CPU build reachable ({cpu_index} unreachable, no torch-*+cpu wheel in pip's "
            "find-links): pip's default torch, a CUDA build on Linux x86_64 (≈ 5 GB)"
        ),
        [f"torch{spec}"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="the project's torch range, e.g. '>=2.4,<=2.14.1'")
    args = parser.parse_args(argv)
    mode = os.environ.get("M2DIFF_TORCH", "auto").strip().lower() or "auto"
    try:
        chosen, reason, pip_args = choose(
            mode,
            args.spec,
            has_torch=installed_torch(),
            gpu=nvidia_gpu() if mode == "auto" else (False, "not checked"),
            cpu_index=os.environ.get("M2DIFF_TORCH_CPU_INDEX", DEFAULT_CPU_INDEX),
            index_ok=index_answers,
            find_links=pip_find_links,
        )
    except ValueError as err:
        print(f"[setup] {err}", file=sys.stderr)
        return 2
    print(f"M2DIFF_TORCH_MODE={shlex.quote(chosen)}")
    print(f"M2DIFF_TORCH_REASON={shlex.quote(reason)}")
    print(f"M2DIFF_TORCH_PIP_ARGS=({' '.join(shlex.quote(a) for a in pip_args)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
