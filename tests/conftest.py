"""Fixtures shared by the test files.

Shared helpers are plain modules next to this file, imported by name (``pythonpath = ["tests"]`` in pyproject.toml):
``tiny_networks`` (the tiny network configs and ``save_checkpoint``), ``inference_checkpoints`` (the inference tests'
checkpoints), ``export_source`` (the export tests' checkpoint; fixtures ``source``, ``exported`` below),
``synthetic_slices`` (2-D slice manifests), ``badinputs`` (NIfTI subjects and the bad-input corpus).
"""

import json
from pathlib import Path

import pytest
import torch

from export_source import BUNDLE, TINY_V6, write_checkpoint
from m2diff_monai.export.cli import main as export_main
from synthetic_slices import write_synthetic_manifest


@pytest.fixture
def one_torch_thread():
    """Tiny networks run fastest on one thread, above all on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def slice_manifest(tmp_path_factory) -> Path:
    """A 16² slice manifest (4 subjects: 2 training, 1 validation, 1 test; 2 slices per orientation, all with MRI),
    written once per session. Read-only: a test that changes it writes its own with ``write_synthetic_manifest``."""
    return write_synthetic_manifest(tmp_path_factory.mktemp("slices"), size=16, slices_per_orientation=2, seed=0)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny M2Diff V6 checkpoint (16³ cubes), its demo manifest and a metrics CSV (test_export, test_deploy)."""
    root = tmp_path_factory.mktemp("source")
    manifest = root / "demo.json"
    manifest.write_text(
        json.dumps(
            {
                "name": "demo",
                "description": "m2diff-monai preprocessed data (3 subjects)",
                "size": 16,
                "training": [{}] * 6,
                "validation": [{}] * 2,
                "test": [{}] * 2,
                "volumes": [{}] * 3,
                "provenance": {
                    "tool": "m2diff-preprocess",
                    "version": "0.1.0",
                    "created": "2026-01-01T00:00:00",
                    "parameters": {"size": 16, "normalization": "paper"},
                    "notes": "Simulated PET on real MNI152 anatomy (demo cohort). Not patient data.",
                },
            }
        )
    )
    metrics = root / "summary.csv"
    metrics.write_text("method,psnr,ssim\nm2diff,31.25,0.912\nld_pet,25.5,0.801\n")
    return {"checkpoint": write_checkpoint(root / "best.pt", TINY_V6, manifest), "metrics": metrics, "root": root}


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """``source`` exported with m2diff-export as a MONAI bundle folder."""
    out = tmp_path_factory.mktemp("export") / "m2diff_bundle"
    rc = export_main(
        [
            "--bundle",
            str(BUNDLE),
            "--checkpoint",
            str(source["checkpoint"]),
            "--out",
            str(out),
            "--metrics",
            str(source["metrics"]),
            "--no-progress",
        ]
    )
    assert rc == 0
    return out
