"""The project checkpoint: its format, writing, reading, the EMA/raw weights choice and rebuilding the network.

One owner for every caller: the training handlers (save, resume, stage-1 weights), ``m2diff-infer``,
``m2diff-export`` (the training checkpoint it reads and the ``models/model.pt`` it writes and loads back), the
MONAI Deploy runner and the complexity table. It sits at the bottom layer: it uses ``networks.factory`` and
``diffusion`` (both below it) and nothing above (no inference, evaluation or export imports).

Format (``docs/ARCHITECTURE.md``) — a dict saved with ``torch.save`` and read with ``torch.load(weights_only=True)``
so that a checkpoint from an untrusted source cannot run code::

    {"network": raw state dict, "ema": EMA state dict | None, "optimizer", "scaler", "epoch", "iteration",
     "config": {"network", "diffusion", "data", "inference_defaults", ["training"]}, ...extras}

``config["network"]`` rebuilds the network with :func:`~m2diff_monai.networks.factory.build_network`. An exported
``models/model.pt`` has the same shape with the chosen weights under ``"network"``, ``"ema": None`` and an
``"export"`` record naming which weights they were.

Weights vocabulary: ``"ema"`` (the exponential moving average IDDPM samples with) or ``"raw"`` (the optimizer's
weights, stored under the ``"network"`` key; the official M2Diff code keeps only these). ``"network"`` is accepted
as an alias of ``"raw"`` wherever a user names the choice (bundle key ``stage1_weights``, ``--weights``), since
the training handlers used that spelling.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m2diff_monai.diffusion import resolve_clip
from m2diff_monai.errors import InputError
from m2diff_monai.io.atomic import write_with
from m2diff_monai.networks.factory import build_network

EMA = "ema"
RAW = "raw"
WEIGHT_CHOICES: tuple[str, ...] = (EMA, RAW)
WEIGHT_ALIASES: dict[str, str] = {"network": RAW}
# Where each choice lives in the checkpoint dict.
STATE_KEY: dict[str, str] = {EMA: "ema", RAW: "network"}
CHECKPOINT_KEYS: tuple[str, ...] = ("network", "ema", "optimizer", "scaler", "epoch", "iteration", "config")
CONFIG_KEYS: tuple[str, ...] = ("network", "diffusion", "data", "inference_defaults")


# ------------------------------------------------------------------------------------------- the weights choice
def weights_choice(value: str | None) -> str | None:
    """``"ema"`` / ``"raw"`` (``"network"`` accepted for ``"raw"``), None kept as None ("EMA when present")."""
    if value is None:
        return None
    name = str(value).strip().lower()
    name = WEIGHT_ALIASES.get(name, name)
    if name not in WEIGHT_CHOICES:
        raise InputError(f"weights must be one of {', '.join(WEIGHT_CHOICES)}, got {value!r}")
    return name


def _has(checkpoint: Mapping[str, Any], choice: str) -> bool:
    """An EMA counts when it holds tensors; raw weights may be empty (a parameter-free network, e.g. identity)."""
    state = checkpoint.get(STATE_KEY[choice])
    return isinstance(state, Mapping) and (bool(state) or choice == RAW)


def select_weights(
    checkpoint: Mapping[str, Any],
    weights: str | None = None,
    *,
    fallback: bool | None = None,
    path: str | Path | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """``(choice, state dict)`` of the checkpoint's ``weights``.

    ``weights`` None means "the EMA weights when the checkpoint has them, else the raw ones". ``fallback``
    (default: True for None, False for an explicit choice) takes the other set when the asked one is absent;
    without it an absent set is a one-line InputError naming ``path``.
    """
    choice = weights_choice(weights) or EMA
    if fallback is None:
        fallback = weights is None
    if not _has(checkpoint, choice):
        other = RAW if choice == EMA else EMA
        if not (fallback and _has(checkpoint, other)):
            what = "EMA" if choice == EMA else "raw network"
            raise InputError(f"checkpoint has no {what} weights (choose the {other} weights)", path=path)
        choice = other
    return choice, dict(checkpoint[STATE_KEY[choice]])


# --------------------------------------------------------------------------------------------- format and write
def new_checkpoint(
    network_state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    ema_state: Mapping[str, torch.Tensor] | None = None,
    optimizer: Mapping[str, Any] | None = None,
    scaler: Mapping[str, Any] | None = None,
    epoch: int | None = 0,
    iteration: int | None = 0,
    **extras: Any,
) -> dict[str, Any]:
    """The checkpoint dict in the project format; ``extras`` (``best_metric``, ``export``, ...) are added as is."""
    return {
        "network": network_state,
        "ema": ema_state,
        "optimizer": optimizer,
        "scaler": scaler,
        "epoch": epoch,
        "iteration": iteration,
        "config": config,
        **extras,
    }


def write_checkpoint(path: str | Path, checkpoint: Mapping[str, Any]) -> Path:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: never a half-written file."""
    return write_with(path, lambda tmp: torch.save(dict(checkpoint), tmp))


# ------------------------------------------------------------------------------------------------------- read
def read_checkpoint(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict; every way a file can be wrong becomes one ``InputError`` line naming it.

    ``mmap``: memory-map the tensors instead of reading them (for callers that only need the config); falls back
    to a plain read for files torch cannot map (the legacy, non-zip format).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("checkpoint does not exist", path=path)
    if not path.is_file():
        raise InputError("checkpoint is not a file", path=path)
    checkpoint: Any = None
    if mmap:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except Exception:  # not a zip checkpoint (mmap needs one) or unreadable: the plain read says why
            checkpoint = None
    if checkpoint is None:
        try:
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # UnpicklingError, BadZipFile, EOFError, RuntimeError, a text file's KeyError, ...
            detail = " ".join(str(err).split())[:200]
            raise InputError(f"cannot read the checkpoint ({type(err).__name__}: {detail})", path=path) from None
    if not isinstance(checkpoint, dict):
        raise InputError(
            f"checkpoint holds a {type(checkpoint).__name__}, not the project's checkpoint dict", path=path
        )
    config = checkpoint.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("network"), dict):
        raise InputError("checkpoint has no config['network'] (was it written by m2diff-monai training?)", path=path)
    if not (_has(checkpoint, EMA) or _has(checkpoint, RAW)):
        raise InputError("checkpoint holds no network weights ('network' / 'ema')", path=path)
    return checkpoint


def file_sha256(path: str | Path) -> str:
    """The checkpoint file's SHA-256 (exports record which file they came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- network and configuration
def rebuild_network(config: Mapping[str, Any], path: str | Path | None = None) -> torch.nn.Module:
    """``build_network(config["network"])`` of a checkpoint's config; InputError naming ``path`` if it fails."""
    try:
        return build_network(dict(config["network"]))
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"cannot rebuild the network from the checkpoint's config ({err})", path=path) from None


def load_weights(
    network: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    path: str | Path | None = None,
    what: str = "weights",
) -> list[str]:
    """Load ``state`` into ``network``. Strict: every tensor must fit, else one InputError line naming ``path``.
    Non-strict: loads the tensors whose name and shape fit and returns the network's keys left unloaded."""
    if not strict:
        own = network.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        network.load_state_dict(fitting, strict=False)
        return sorted(set(own) - set(fitting))
    try:
        network.load_state_dict(dict(state))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{what} do not fit the network ({first})", path=path) from None
    return []


def resolved_diffusion(config: Mapping[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The stored diffusion config with ``clip_denoised: "auto"`` resolved for the training data's normalization."""
    try:
        return resolve_clip(dict(config.get("diffusion") or {}), config.get("data"))
    except ValueError as err:
        raise InputError(f"invalid diffusion config in the checkpoint ({err})", path=path) from None


def stored_inference_defaults(config: Mapping[str, Any], path: str | Path | None = None) -> dict[str, Any]:
    """The sampler settings the training run was evaluated with, as stored (``{}`` when none). Their values are
    checked where they are used (``inference.defaults.check_inference_defaults``): this layer knows no settings."""
    stored = config.get("inference_defaults")
    if stored is None:
        return {}
    if not isinstance(stored, Mapping):
        raise InputError(
            f"invalid inference_defaults in the checkpoint (a {type(stored).__name__}, not a dict)", path=path
        )
    return copy.deepcopy(dict(stored))


# ------------------------------------------------------------------------------------------ a model to sample
@dataclass
class LoadedModel:
    """A network ready for sampling, with the configuration of the training run it came from."""

    network: torch.nn.Module
    diffusion_config: dict[str, Any]
    data_config: dict[str, Any]
    network_config: dict[str, Any]
    weights: str  # "ema" or "raw"
    path: str = ""
    epoch: int | None = None
    iteration: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The sampler settings the training run was evaluated with (``config["inference_defaults"]``; {} when none).
    inference_defaults: dict[str, Any] = field(default_factory=dict)
    # How it was trained (``config["training"]``; {} for checkpoints written before it was recorded).
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_max_timestep(self) -> int | None:
        """The largest timestep the network was trained at, when training drew t from a truncated range."""
        value = self.training.get("train_max_timestep")
        return None if value is None else int(value)

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


def _frozen(network: torch.nn.Module, device: torch.device | str | None, sampling: bool = True) -> torch.nn.Module:
    if device is not None:
        network = network.to(torch.device(device))
    network = network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    for_sampling = getattr(network, "for_sampling", None)  # skip outputs only the training loss reads
    if sampling and callable(for_sampling):
        for_sampling()
    return network


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    weights: str | None = None,
    *,
    fallback: bool | None = None,
    network: torch.nn.Module | None = None,
    diffusion: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    sampling: bool = True,
) -> LoadedModel:
    """Read a checkpoint, rebuild its network (or fill the given ``network``) with the chosen weights and return
    it frozen, in eval mode, on ``device``; ``sampling`` (default) also drops branches only the training loss reads
    (M2Diff's ``for_sampling``); ``sampling=False`` keeps every branch (e.g. to look at the MRI decoder's features).

    ``weights``/``fallback``: see :func:`select_weights` (None: EMA when present, else raw). An exported
    ``models/model.pt`` records the weights it was exported with, and ``weights`` reports that choice.
    ``network``, ``diffusion`` and ``data_config`` replace what the checkpoint's config would give (an exported
    bundle builds its network from ``network_def`` and passes its configs).
    """
    checkpoint = read_checkpoint(path, map_location="cpu")
    config = checkpoint["config"]
    choice, state = select_weights(checkpoint, weights, fallback=fallback, path=path)
    if network is None:
        network = rebuild_network(config, path)
    load_weights(network, state, path=path, what=f"{choice} weights")
    data = dict(data_config if data_config is not None else config.get("data") or {})
    resolved = resolved_diffusion(
        {"diffusion": diffusion if diffusion is not None else config.get("diffusion"), "data": data}, path
    )
    exported = checkpoint.get("export") or {}
    return LoadedModel(
        network=_frozen(network, device, sampling),
        diffusion_config=resolved,
        data_config=data,
        network_config=dict(getattr(network, "config", None) or config["network"]),
        weights=weights_choice(exported.get("weights")) or choice,
        path=str(path),
        epoch=checkpoint.get("epoch"),
        iteration=checkpoint.get("iteration"),
        extras={k: checkpoint[k] for k in ("best_metric", "best_metric_epoch") if k in checkpoint},
        inference_defaults=stored_inference_defaults(config, path),
        training=dict(config.get("training") or {}),
    )


# ------------------------------------------------------------------------------- a bundle's network_def and model
EXPORTED_MODEL_PT = "models/model.pt"
NO_CHECKPOINT = "inference needs a checkpoint: add --checkpoint PATH"


def bundle_network(
    network_config: Mapping[str, Any] | None = None, checkpoint: str | Path | None = None
) -> torch.nn.Module:
    """A bundle's ``network_def``: the network built from ``network_config`` (an exported bundle embeds it), else
    from the stored config of ``checkpoint`` (a source bundle, whose ``network_config`` is null)."""
    if network_config:
        return build_network(dict(network_config))
    if not checkpoint:
        raise InputError(NO_CHECKPOINT)
    return rebuild_network(read_checkpoint(checkpoint, mmap=True)["config"], checkpoint)


def bundle_model(
    network: torch.nn.Module,
    checkpoint: str | Path | None,
    diffusion_config: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> LoadedModel:
    """A bundle's ``model``: ``network`` (its ``network_def``) with the weights of ``checkpoint``, as the
    ``LoadedModel`` the inference entry point takes. ``diffusion_config``/``data_config``: an exported bundle's
    embedded configs; None (a source bundle) takes the checkpoint's. ``use_ema``: the EMA weights when present
    (an exported ``models/model.pt`` holds one set, which is used either way), else the raw ones."""
    if not checkpoint:
        raise InputError(NO_CHECKPOINT)
    path = Path(checkpoint)
    if not path.exists() and path.as_posix().endswith(EXPORTED_MODEL_PT):
        raise InputError(
            f"the exported bundle's {EXPORTED_MODEL_PT} is not here; run from the exported bundle "
            "folder or pass --bundle_root EXPORTED_DIR (or --checkpoint PATH)",
            path=path,
        )
    return load_model(
        path,
        device=None,
        weights=EMA if use_ema else RAW,
        fallback=True,
        network=network,
        diffusion=diffusion_config,
        data_config=data_config or None,
    )


def model_from_network(
    network: torch.nn.Module,
    diffusion_config: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    inference_defaults: Mapping[str, Any] | None = None,
) -> LoadedModel:
    """Wrap an in-memory network (tests, notebooks, the benchmark) the way :func:`load_model` wraps a checkpoint."""
    network = network.to(torch.device(device)).eval()
    return LoadedModel(
        network=network,
        diffusion_config=resolve_clip(dict(diffusion_config or {}), data_config),
        data_config=dict(data_config or {}),
        network_config=dict(getattr(network, "config", None) or {}),
        weights=RAW,
        inference_defaults=stored_inference_defaults({"inference_defaults": inference_defaults}),
    )


__all__ = [
    "CHECKPOINT_KEYS",
    "CONFIG_KEYS",
    "EMA",
    "RAW",
    "WEIGHT_ALIASES",
    "WEIGHT_CHOICES",
    "LoadedModel",
    "bundle_model",
    "bundle_network",
    "resolved_diffusion",
    "file_sha256",
    "load_model",
    "load_weights",
    "model_from_network",
    "new_checkpoint",
    "read_checkpoint",
    "rebuild_network",
    "select_weights",
    "stored_inference_defaults",
    "weights_choice",
]
