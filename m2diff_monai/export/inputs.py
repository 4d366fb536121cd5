"""What ``m2diff-export`` reads: the source bundle's configs, the checkpoint (through ``m2diff_monai.checkpoint``),
the preprocessing the model was trained with (frozen into the export) and the license."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2diff_monai.checkpoint import file_sha256, load_model
from m2diff_monai.errors import InputError

REQUIRED_CONFIGS = ("inference.json", "metadata.json")
OPTIONAL_CONFIGS = ("train.json", "multi_gpu_train.json", "evaluate.json", "logging.conf")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"not valid JSON ({err})", path=path) from None
    if not isinstance(content, dict):
        raise InputError("expected a JSON object", path=path)
    return content


def read_source_bundle(bundle: str | Path) -> dict[str, Any]:
    """``{file name: parsed JSON or text}`` of the source bundle's configs; InputError for a bundle without
    ``inference.json`` / ``metadata.json`` or with unreadable JSON."""
    folder = Path(bundle)
    if not folder.is_dir():
        raise InputError("bundle folder does not exist", path=folder)
    configs: dict[str, Any] = {}
    for name in REQUIRED_CONFIGS:
        if not (folder / name).is_file():
            raise InputError(f"bundle folder has no {name}", path=folder)
    for name in REQUIRED_CONFIGS + OPTIONAL_CONFIGS:
        path = folder / name
        if path.is_file():
            configs[name] = path.read_text() if name.endswith(".conf") else _read_json(path)
    return configs


def load_checkpoint_for_export(checkpoint: str | Path, weights: str | None = None) -> dict[str, Any]:
    """Read and check the checkpoint, rebuild its network with the chosen weights (``m2diff_monai.checkpoint``;
    None: EMA when present, else raw; an explicit choice must exist).

    Returns ``{"network", "weights", "state", "config": {"network", "diffusion", "data", "inference_defaults",
    ["training"]},
    "epoch", "iteration", "path", "sha256"}``; InputError (one line naming the file) for every way the checkpoint
    can be wrong.
    """
    from m2diff_monai.inference.defaults import check_stored_defaults

    path = Path(checkpoint)
    model = load_model(path, device="cpu", weights=weights)
    return {
        "network": model.network,
        "weights": model.weights,
        "state": {k: v.detach().cpu().clone() for k, v in model.network.state_dict().items()},
        "config": {
            "network": copy.deepcopy(model.network_config),
            "diffusion": model.diffusion_config,
            "data": copy.deepcopy(model.data_config),
            "inference_defaults": check_stored_defaults(model.inference_defaults, path),
            **({"training": copy.deepcopy(model.training)} if model.training else {}),
        },
        "epoch": model.epoch,
        "iteration": model.iteration,
        "path": path,
        "sha256": file_sha256(path),
    }


def freeze_preprocessing(data_config: Mapping[str, Any], image_size: int | None) -> dict[str, Any]:
    """The preprocessing parameters inference will use, resolved now (checkpoint → training manifest provenance
    → defaults) and stored as ``data["preprocessing"]``, so the exported bundle does not need the manifest."""
    from m2diff_monai.inference.preprocess import resolve_preprocessing

    prep = resolve_preprocessing(dict(data_config), {}, image_size)
    frozen = {
        "size": prep.size,
        "normalization": prep.normalization,
        "transform": prep.transform,
        "space": prep.space,
        "seed": prep.seed,
        "spacing": "native" if prep.spacing is None else list(prep.spacing),
    }
    return {"values": frozen, "spatial_size": prep.spatial_size, "sources": dict(prep.sources)}


def license_text(bundle: Path) -> str:
    """The source bundle's LICENSE, else the installed distribution's (a wheel's, or an editable install's)."""
    if (bundle / "LICENSE").is_file():
        return (bundle / "LICENSE").read_text()
    try:
        dist = importlib.metadata.distribution("m2diff-monai")
        for name in ("licenses/LICENSE", "LICENSE"):
            text = dist.read_text(name)
            if text:
                return text
        # metadata that only lists the file (a source tree's egg-info on the path): read it where it lies
        for file in dist.files or ():
            located = Path(str(dist.locate_file(file)))
            if file.name == "LICENSE" and located.is_file():
                return located.read_text()
    except importlib.metadata.PackageNotFoundError:
        pass
    raise InputError("no LICENSE found (bundle folder or installed package)", path=bundle)


__all__ = [
    "OPTIONAL_CONFIGS",
    "REQUIRED_CONFIGS",
    "freeze_preprocessing",
    "license_text",
    "load_checkpoint_for_export",
    "read_source_bundle",
]
