"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny networks run fastest on one thread, above all on a busy 2-core machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
