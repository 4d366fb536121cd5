"""Load a project checkpoint and rebuild its network and diffusion from the configuration it carries.

Checkpoints (``docs/ARCHITECTURE.md``) are ``{"network", "ema", "optimizer", "scaler", "epoch", "iteration",
"config": {"network", "diffusion", "data", "inference_defaults"}}``, loaded with ``torch.load(weights_only=True)`` so that a checkpoint
from an untrusted source cannot run code. Inference samples with the EMA weights by default (IDDPM samples with
its EMA; the official M2Diff code keeps none, in which case ``ema`` is None and the raw weights are used).
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2diff_monai.diffusion import resolve_clip
from m2diff_monai.errors import InputError
from m2diff_monai.networks.factory import build_network


@dataclass
class LoadedModel:
    """A network ready for sampling, with the configuration of the training run it came from."""

    network: torch.nn.Module
    diffusion_config: dict[str, Any]
    data_config: dict[str, Any]
    network_config: dict[str, Any]
    weights: str  # "ema" or "network"
    path: str = ""
    epoch: int | None = None
    iteration: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The sampler settings the training run was evaluated with (``config["inference_defaults"]``; {} when none).
    inference_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def is_diffusion(self) -> bool:
        return bool(getattr(self.network, "is_diffusion", True))

    @property
    def requires_mri(self) -> bool:
        """True when the network cannot run without an MRI (MFdiff rows built with ``allow_missing_mri=False``)."""
        net = self.network
        return bool(getattr(net, "uses_mri", False)) and not bool(getattr(net, "allow_missing_mri", True))

    @property
    def image_size(self) -> int | None:
        size = self.network_config.get("image_size")
        return None if size is None else int(size)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict; every way a file can be wrong becomes one ``InputError`` line naming it."""
    path = Path(path)
    if not path.exists():
        raise InputError("checkpoint does not exist", path=path)
    if not path.is_file():
        raise InputError("checkpoint is not a file", path=path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError, ValueError) as err:
        detail = " ".join(str(err).split())[:200]
        raise InputError(f"cannot read the checkpoint ({type(err).__name__}: {detail})", path=path) from None
    if not isinstance(checkpoint, dict):
        raise InputError(f"checkpoint holds a {type(checkpoint).__name__}, not the project's checkpoint dict", path=path)
    config = checkpoint.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("network"), dict):
        raise InputError(
            "checkpoint has no config['network'] (was it written by m2diff-monai training?)", path=path
        )
    if not isinstance(checkpoint.get("network"), dict) and not isinstance(checkpoint.get("ema"), dict):
        raise InputError("checkpoint holds no network weights ('network' / 'ema')", path=path)
    return checkpoint


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
) -> LoadedModel:
    """Rebuild the network with ``build_network(config["network"])`` and load the EMA (default) or raw weights."""
    checkpoint = read_checkpoint(path, map_location="cpu")
    config = checkpoint["config"]
    try:
        network = build_network(config["network"])
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"cannot rebuild the network from the checkpoint's config ({err})", path=path) from None
    try:
        diffusion_config = resolve_clip(config.get("diffusion") or {}, config.get("data"))
    except ValueError as err:
        raise InputError(f"invalid diffusion config in the checkpoint ({err})", path=path) from None
    inference_defaults = stored_inference_defaults(config, path)
    ema = checkpoint.get("ema")
    weights = "ema" if use_ema and isinstance(ema, dict) and ema else "network"
    state = ema if weights == "ema" else checkpoint.get("network")
    if not isinstance(state, dict):
        raise InputError("checkpoint has no raw network weights (use the EMA weights)", path=path)
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"weights do not fit the network in the checkpoint's config ({first})", path=path) from None
    network = network.to(torch.device(device)).eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return LoadedModel(
        network=network,
        diffusion_config=diffusion_config,
        data_config=dict(config.get("data") or {}),
        network_config=dict(getattr(network, "config", None) or config["network"]),
        weights=weights,
        path=str(path),
        epoch=checkpoint.get("epoch"),
        iteration=checkpoint.get("iteration"),
        extras={k: checkpoint[k] for k in ("best_metric", "best_metric_epoch") if k in checkpoint},
        inference_defaults=inference_defaults,
    )


def stored_inference_defaults(config: dict[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The checkpoint config's ``inference_defaults`` checked (absent in older checkpoints: {})."""
    from m2diff_monai.inference.defaults import check_inference_defaults

    try:
        return check_inference_defaults(config.get("inference_defaults"))
    except ValueError as err:
        raise InputError(f"invalid inference_defaults in the checkpoint ({err})", path=path) from None


def model_from_network(
    network: torch.nn.Module,
    diffusion_config: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    inference_defaults: dict[str, Any] | None = None,
) -> LoadedModel:
    """Wrap an in-memory network (tests, notebooks, the benchmark) the way :func:`load_model` wraps a checkpoint."""
    network = network.to(torch.device(device)).eval()
    return LoadedModel(
        network=network,
        diffusion_config=resolve_clip(diffusion_config or {}, data_config),
        data_config=dict(data_config or {}),
        network_config=dict(getattr(network, "config", None) or {}),
        weights="network",
        inference_defaults=stored_inference_defaults({"inference_defaults": inference_defaults}),
    )
