"""Fixtures shared by the test files.

Shared helpers are plain modules next to this file, imported by name (``pythonpath = ["tests"]`` in pyproject.toml):
``tiny_networks`` (the tiny network configs and ``save_checkpoint``), ``inference_checkpoints`` (the inference tests'
checkpoints), ``synthetic_slices`` (2-D slice manifests), ``badinputs`` (NIfTI subjects and the bad-input corpus).
"""

from pathlib import Path

import pytest
import torch

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
