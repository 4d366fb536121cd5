"""The exported bundle driven the way MONAI Deploy's ``MonaiBundleInferenceOperator`` drives a bundle, and the
``inference.json`` ids that make it possible.

The operator (monai-deploy-app-sdk 4.0, ``monai_bundle_inference_operator.py``) parses ``configs/metadata.json``
and ``configs/inference.json`` with ``monai.bundle.ConfigParser``, loads ``models/model.ts`` (else instantiates
``network``/``network_def`` and loads ``models/model.pt``), then per request: ``preprocessing`` (a dict
``Compose``) → ``inferer(inputs=<first input, batch dim added>, network=..., **other tensor inputs)`` →
``postprocessing`` (with the preprocessed inputs merged back in). :func:`run_bundle_on_volume` is exactly that
sequence with this bundle's keys. The generic operator itself cannot host this bundle unchanged: it names its I/O
ports after ``network_data_format``, which honestly describes the 2D denoiser in ``model.ts`` (``x_t, t, ld, mri,
mri_available`` → ``out``), not the volume in/volume out application, and it casts ``image`` outputs to uint8 (a
segmentation convention that would destroy PET values). An application wraps :func:`run_bundle_on_volume` in its
own operator instead (``benchmarks/deploy_app.py`` shows one with the App SDK).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2diff_monai.checkpoint import load_weights, read_checkpoint, select_weights
from m2diff_monai.deploy.inferer import as_project_network
from m2diff_monai.deploy.transforms import MASK_KEY

LD_KEY, MRI_KEY, PRED_KEY = "image", "mri", "pred"


def read_bundle_config(bundle: str | Path):
    """``ConfigParser`` over ``configs/metadata.json`` (as ``_meta_``) and ``configs/inference.json``, parsed."""
    from monai.bundle import ConfigParser

    bundle = Path(bundle)
    parser = ConfigParser()
    parser.read_meta(f=str(bundle / "configs" / "metadata.json"))
    parser.read_config(f=str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser.parse()
    return parser


def load_bundle_network(
    bundle: str | Path, parser: Any = None, device: torch.device | str = "cpu", prefer: str = "ts"
) -> torch.nn.Module:
    """``models/model.ts`` (TorchScript, what the operator loads first), or with ``prefer="pt"`` the eager network
    from ``network_def`` with ``models/model.pt``'s weights (the operator's fallback)."""
    bundle = Path(bundle)
    if prefer == "ts" and (bundle / "models" / "model.ts").is_file():
        return torch.jit.load(str(bundle / "models" / "model.ts"), map_location=device).eval()
    parser = parser or read_bundle_config(bundle)
    network = parser.get_parsed_content("network_def").to(device)
    path = bundle / "models" / "model.pt"
    _, state = select_weights(read_checkpoint(path, map_location=device), path=path)
    load_weights(network, state, path=path)
    return network.eval()


def run_bundle_on_volume(
    bundle: str | Path,
    ld: torch.Tensor | np.ndarray,
    mri: torch.Tensor | np.ndarray | None = None,
    *,
    parser: Any = None,
    network: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
    overrides: Mapping[str, Any] | None = None,
) -> Any:
    """One LD PET volume (original units, on the model's grid; a ``MetaTensor`` keeps its affine) + optional T1
    → the enhanced volume in original units, shaped like ``ld``: preprocessing → inferer → postprocessing.
    ``overrides``: config ids to set before parsing (e.g. ``{"steps": 10}``)."""
    parser = parser or read_bundle_config(bundle)
    for key, value in (overrides or {}).items():
        parser[key] = value
    if overrides:
        parser.parse()
    network = network if network is not None else load_bundle_network(bundle, parser, device)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    shape = tuple(np.shape(ld))
    data = preprocessing({LD_KEY: ld, **({MRI_KEY: mri} if mri is not None else {})})
    first = data[LD_KEY][None].to(device)  # the operator adds the batch dimension to every tensor input
    others = {k: data[k][None].to(device) for k in (MRI_KEY, MASK_KEY) if isinstance(data.get(k), torch.Tensor)}
    with torch.no_grad():
        prediction = inferer(inputs=first, network=as_project_network(network), **others)
    out = postprocessing({**data, PRED_KEY: prediction[0]})[PRED_KEY]
    return out.reshape(shape) if len(shape) == 3 else out
