"""LPIPS rebuilt without torchvision (m2diff_monai/evaluation/lpips_net.py) against the real lpips 0.1.4 package.

The reference numbers below were computed by ``lpips.LPIPS(net="alex", version="0.1", pnet_rand=True)`` (lpips
0.1.4 with torchvision 0.29.1, torch 2.14.1) after loading the formula-defined trunk of ``_trunk_state`` into
its AlexNet slices; its heads came from its own ``weights/v0.1/alex.pth``. They hold whatever torch build (CPU or
CUDA) runs the tests, and need neither torchvision nor lpips, which a CPU install does not have.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from m2diff_monai.evaluation.lpips_net import (
    AlexLPIPS,
    alexnet_features,
    lpips_heads_path,
)

# lpips 0.1.4's weights/v0.1/alex.pth (torchmetrics ships the same bytes)
LPIPS_V01_ALEX_SHA256 = "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0"
# torchvision.models.alexnet(weights=None).features: parameter names and shapes
TORCHVISION_ALEXNET_FEATURES = {
    "0.weight": (64, 3, 11, 11),
    "0.bias": (64,),
    "3.weight": (192, 64, 5, 5),
    "3.bias": (192,),
    "6.weight": (384, 192, 3, 3),
    "6.bias": (384,),
    "8.weight": (256, 384, 3, 3),
    "8.bias": (256,),
    "10.weight": (256, 256, 3, 3),
    "10.bias": (256,),
}
# lpips.LPIPS outputs for _images(): RGB inputs, then their first channel alone (lpips broadcasts it)
REFERENCE_RGB = [0.0, 0.012265559285879135, 0.2289043366909027, 0.06285388022661209]
REFERENCE_ONE_CHANNEL = [0.0, 0.00607683602720499, 0.3044778108596802, 0.025413529947400093]


def _trunk_state() -> dict[str, torch.Tensor]:
    """Deterministic trunk weights (no RNG: the same on every torch version)."""
    state = {}
    for i, (key, value) in enumerate(alexnet_features().state_dict().items()):
        n = value.numel()
        state[f"features.{key}"] = (
            (0.08 * torch.sin(0.37 * torch.arange(n, dtype=torch.float64) + 0.5 * i)).float().view_as(value)
        )
    return state


def _images() -> tuple[torch.Tensor, torch.Tensor]:
    """Four pairs of 72×64 images in [−1, 1]: identical, an affine change, a different pattern flipped, a tanh."""
    u, v = torch.meshgrid(torch.arange(72.0), torch.arange(64.0), indexing="ij")
    a = torch.stack([torch.sin(0.11 * u + c) * torch.cos(0.07 * v - c) for c in (0.0, 0.4, 0.9)])
    b = torch.stack([torch.sin(0.13 * u + c) * torch.cos(0.05 * v + c) for c in (0.1, 0.3, 0.7)])
    first = torch.stack([a, a, b, 0.5 * a])
    second = torch.stack([a, 0.8 * a + 0.1, b.flip(-1), torch.tanh(2 * a)])
    return first.float(), second.float()


@pytest.fixture(scope="module")
def model() -> AlexLPIPS:
    net = AlexLPIPS()
    net.load_trunk(_trunk_state())
    net.load_heads(lpips_heads_path())
    return net.eval()


def test_heads_are_lpips_v01_alexnet_weights():
    path = lpips_heads_path()
    assert path is not None and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LPIPS_V01_ALEX_SHA256


def test_trunk_has_torchvision_alexnet_names_and_shapes():
    shapes = {key: tuple(value.shape) for key, value in alexnet_features().state_dict().items()}
    assert shapes == TORCHVISION_ALEXNET_FEATURES


def test_matches_the_lpips_package(model):
    x, y = _images()
    with torch.no_grad():
        rgb = model(x, y)
        one = model(x[:, :1], y[:, :1])
    assert rgb.shape == (4, 1, 1, 1)
    torch.testing.assert_close(rgb.flatten(), torch.tensor(REFERENCE_RGB), atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(one.flatten(), torch.tensor(REFERENCE_ONE_CHANNEL), atol=2e-6, rtol=1e-4)


def test_one_pass_for_both_images_equals_scoring_pairs_alone(model):
    x, y = _images()
    with torch.no_grad():
        together = model(x, y).flatten()
        alone = torch.cat([model(x[i : i + 1], y[i : i + 1]).flatten() for i in range(len(x))])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_trunk_loading_is_strict(model):
    state = _trunk_state()
    del state["features.8.bias"]
    with pytest.raises(RuntimeError, match="features.8.bias"):
        AlexLPIPS().load_trunk(state)


def test_metric_without_heads_says_so(monkeypatch):
    from m2diff_monai.evaluation import lpips_net
    from m2diff_monai.evaluation.lpips_metric import LPIPSMetric

    monkeypatch.setattr(lpips_net, "HEADS_LOCATIONS", (("torchmetrics", "no/such/alex.pth"),))
    metric = LPIPSMetric(_allow_random_backbone=True)
    assert not metric.available and metric.model is None
    assert metric.reason == (
        "LPIPS unavailable: lpips v0.1 AlexNet heads not found (torchmetrics/no/such/alex.pth); reinstall torchmetrics"
    )


def test_the_metric_imports_neither_torchvision_nor_lpips():
    """What lets a CPU install (no usable torchvision) compute LPIPS; checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom m2diff_monai.evaluation.lpips_metric import LPIPSMetric\n"
        "import numpy as np\nm = LPIPSMetric(_allow_random_backbone=True)\n"
        "assert m.available, m.reason\nassert np.isfinite(m(np.eye(40), np.ones((40, 40))))\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torchvision', 'lpips')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
