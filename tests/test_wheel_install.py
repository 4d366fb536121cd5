"""The package works from a wheel, outside its checkout.

Builds a wheel from a copy of the checkout (``pip wheel --no-deps --no-build-isolation``), installs it with
``pip install --no-deps --target SITE`` and runs ``m2diff-preprocess demo`` (smallest cohort), ``m2diff-infer`` and
``m2diff-export`` from an empty temporary folder with ``PYTHONPATH=SITE``, so the wheel's modules win over any
editable install of the checkout (asserted: every ``m2diff_monai``/``preprocessing`` module loaded lives in SITE).
The bundles are given by name (``--bundle m2diff``): the copy the wheel ships (``m2diff_monai.shipped``).
Dependencies come from the test's own environment; only the project itself comes from the wheel.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# What a build may read, copied so that the build's build/ and *.egg-info never land in the checkout.
BUILD_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "work",
    "runs",
    "outputs",
    "tests",
    "benchmarks",
    ".pytest_cache",
    "__pycache__",
    "*.egg-info",
    "*.nii*",
    "*.pt",
)
COMMANDS = ("m2diff-preprocess", "m2diff-infer", "m2diff-evaluate", "m2diff-export")
SHIPPED_SUFFIXES = (".json", ".conf", ".md")
TINY_NETWORK = {
    "name": "m2diff",
    "preset": "demo",
    "variant": "V6",
    "image_size": 32,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [16],
    "num_heads": 2,
    "dropout": 0.0,
}
# One process (each start imports torch and MONAI): the tiny checkpoint, then where every project module came from.
WRITE_CHECKPOINT = """
import json, sys, torch
import m2diff_monai.evaluation.cli, m2diff_monai.export.cli, m2diff_monai.inference.cli, preprocessing.cli
from m2diff_monai.engines.workflow import checkpoint_config
from m2diff_monai.networks.factory import build_network
net = build_network(json.loads(sys.argv[3]))
torch.save({"network": net.state_dict(), "ema": None, "optimizer": {}, "scaler": None, "epoch": 1, "iteration": 1,
            "config": checkpoint_config(net, {"timesteps": 50}, {"manifest": sys.argv[2]})}, sys.argv[1])
print(json.dumps({name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                  if name.split(".")[0] in ("m2diff_monai", "preprocessing")}))
"""


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel, built from a copy of the checkout and installed (no dependencies) into its own folder."""
    backend = subprocess.run([sys.executable, "-c", "import setuptools, wheel"], capture_output=True, text=True)
    if backend.returncode:  # setuptools >= 70.1 brings its own copy of wheel (bdist_wheel)
        pytest.fail(
            f"building a wheel needs setuptools and wheel in {sys.executable}'s environment "
            f"(pyproject.toml [build-system]): {backend.stderr.strip().splitlines()[-1]}"
        )
    root = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    source = root / "source"
    shutil.copytree(REPO, source, ignore=BUILD_IGNORE)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        cwd=root,
        env=env,
    )
    wheels = sorted((root / "dist").glob("m2diff_monai-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    _run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheels[0])],
        cwd=root,
        env=env,
    )
    return {"wheel": wheels[0], "site": site}


def _wheel_env(site: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def test_wheel_holds_both_packages_and_the_bundles_as_in_the_checkout(installed):
    with zipfile.ZipFile(installed["wheel"]) as wheel:
        names = set(wheel.namelist())
        tops = {name.split("/")[0] for name in names}
        assert {"m2diff_monai", "preprocessing"} <= tops
        assert {t for t in tops if not t.endswith(".dist-info")} == {"m2diff_monai", "preprocessing"}
        assert "preprocessing/cli.py" in names and "m2diff_monai/shipped.py" in names
        entry_points = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert all(f"{command} = " in entry_points for command in COMMANDS)
        shipped = {n for n in names if n.startswith("m2diff_monai/bundles/")}
        sources = {
            f"m2diff_monai/bundles/{p.relative_to(REPO / 'bundles')}"
            for p in (REPO / "bundles").glob("*/*")
            if p.is_file() and p.suffix in SHIPPED_SUFFIXES
        }
        assert {
            "m2diff_monai/bundles/m2diff/inference.json",
            "m2diff_monai/bundles/mfdiff/metadata.json",
            "m2diff_monai/bundles/schema/meta_schema.json",
        } <= sources
        assert shipped == sources  # every bundle file, and nothing else: one copy of the truth, copied at build
        for name in shipped:
            assert wheel.read(name) == (REPO / "bundles" / name.removeprefix("m2diff_monai/bundles/")).read_bytes()


@pytest.mark.slow
def test_demo_infer_and_export_run_from_the_installed_wheel(installed, tmp_path):
    site, work = installed["site"], tmp_path / "work"
    work.mkdir()
    env = _wheel_env(site)
    python = [sys.executable, "-m"]

    shipped = Path(_run([*python, "m2diff_monai.shipped", "m2diff"], work, env).stdout.strip())
    assert shipped == site / "m2diff_monai" / "bundles" / "m2diff" and (shipped / "inference.json").is_file()

    _run(
        [
            *python,
            "preprocessing.cli",
            "demo",
            "--out",
            "demo",
            "--subjects",
            "3",
            "--heldout",
            "0",
            "--downsample",
            "4",
            "--iterations",
            "1",
            "--subsets",
            "7",
            "--workers",
            "1",
        ],
        work,
        env,
    )
    manifest = work / "data_manifests" / "demo.json"
    content = json.loads(manifest.read_text())
    assert content["size"] == TINY_NETWORK["image_size"] and content["volumes"]
    with open(work / "demo" / "raw" / "subjects.csv", newline="") as table:
        first = next(csv.DictReader(table))
    ld_pet, mri = (work / "demo" / "raw" / first[key] for key in ("ld_pet", "mri"))
    assert ld_pet.is_file() and mri.is_file()

    checkpoint = work / "tiny.pt"
    loaded = json.loads(
        _run(
            [sys.executable, "-c", WRITE_CHECKPOINT, str(checkpoint), str(manifest), json.dumps(TINY_NETWORK)],
            work,
            env,
        ).stdout
    )
    outside = {name: path for name, path in loaded.items() if path and not Path(path).is_relative_to(site)}
    assert not outside, f"modules not from the wheel: {outside}"
    assert Path(loaded["m2diff_monai"]).is_relative_to(site) and Path(loaded["preprocessing"]).is_relative_to(site)

    prediction = work / "pred" / "subject.nii.gz"
    _run(
        [
            *python,
            "m2diff_monai.inference.cli",
            "--bundle",
            "m2diff",
            "--checkpoint",
            str(checkpoint),
            "--ld-pet",
            str(ld_pet),
            "--mri",
            str(mri),
            "--out",
            str(prediction),
            "--steps",
            "2",
            "--orientations",
            "axial",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--no-progress",
        ],
        work,
        env,
    )
    raw, pred = nib.load(ld_pet), nib.load(prediction)
    assert pred.shape == raw.shape and np.allclose(pred.affine, raw.affine)
    assert np.isfinite(np.asarray(pred.dataobj)).all()

    exported = work / "exported"
    _run(
        [
            *python,
            "m2diff_monai.export.cli",
            "--bundle",
            "m2diff",
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(exported),
            "--no-progress",
        ],
        work,
        env,
    )
    for name in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "models/model.ts",
        "docs/README.md",
        "LICENSE",
    ):
        assert (exported / name).is_file(), name
    assert (exported / "LICENSE").read_text() == (REPO / "LICENSE").read_text()  # from the wheel's dist-info
    metadata = json.loads((exported / "configs/metadata.json").read_text())  # validated against the shipped schema
    assert metadata["network_config"] == TINY_NETWORK | metadata["network_config"]
    card = (exported / "docs/README.md").read_text()
    assert "Trained on the simulated demo cohort" in card and str(manifest) in card  # the manifest, read by the wheel


def test_bundle_names_resolve_to_the_shipped_copy_and_paths_win(tmp_path, monkeypatch):
    from m2diff_monai import shipped
    from m2diff_monai.errors import InputError

    assert shipped.resolve_bundle(REPO / "bundles" / "m2diff") == REPO / "bundles" / "m2diff"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shipped, "shipped_bundles_dir", lambda: None)  # a checkout / editable install: no copy
    with pytest.raises(InputError, match="ships no bundles.*bundles/m2diff"):
        shipped.resolve_bundle("m2diff")
    fake = tmp_path / "site" / "bundles"
    (fake / "m2diff").mkdir(parents=True)
    (fake / "m2diff" / "inference.json").write_text("{}")
    (fake / "schema").mkdir()  # no inference.json: not a bundle name
    monkeypatch.setattr(shipped, "shipped_bundles_dir", lambda: fake)
    assert shipped.shipped_bundle_names() == ["m2diff"]
    assert shipped.resolve_bundle("m2diff") == fake / "m2diff"
    with pytest.raises(InputError, match="shipped bundle names: m2diff"):
        shipped.resolve_bundle("schema")
    (tmp_path / "m2diff").mkdir()  # a folder of that name in the working folder wins over the shipped copy
    assert shipped.resolve_bundle("m2diff") == Path("m2diff")
