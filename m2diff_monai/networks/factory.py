"""Build networks from plain dicts, so the network configuration travels with checkpoints.

``build_network({"name": "m2diff", "preset": "demo", "variant": "V3"})`` fills every missing key from the preset
(default ``"paper-256"``), builds the module and stores the fully resolved dict on it as ``net.config``; checkpoints
save that dict and ``build_network(net.config)`` rebuilds the same architecture without knowing the presets.
Other networks join with ``register_network(name, builder)`` (MFdiff does, in ``networks/mfdiff.py``);
``build_network`` imports ``m2diff_monai.networks.<name>`` on first use of an unregistered name.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from .m2diff import OUTPUT_MODES, V5_DEFAULT_MRI_DROPOUT, VARIANTS, build_m2diff_variant

__all__ = [
    "PRESETS",
    "M2DIFF_DEFAULTS",
    "register_network",
    "registered_networks",
    "build_network",
    "resolve_m2diff_config",
    "build_m2diff",
    "count_parameters",
]

NetworkBuilder = Callable[[Mapping[str, Any]], nn.Module]
_REGISTRY: dict[str, NetworkBuilder] = {}

M2DIFF_DEFAULTS: dict[str, Any] = {
    "name": "m2diff",
    "preset": "paper-256",
    "variant": "V6",
    "image_size": 256,
    "model_channels": 128,
    "channel_mult": [1, 1, 2, 2, 4, 4],
    "num_res_blocks": 2,
    "attention_resolutions": [16, 8],  # feature-map sizes (IDDPM convention: ds = image_size // res)
    "num_heads": 4,
    "dropout": 0.2,
    "mri_dropout": None,  # None = dropout (symmetric decoders); V5 resolves it to V5_DEFAULT_MRI_DROPOUT
    "learn_sigma": False,  # the official code has fixed variance; the paper text describes IDDPM's learned one
    "output_mode": "pet",  # official code: PET branch; "mean": paper Eq. 8
    "use_scale_shift_norm": True,
    "mri_attention": False,  # official asymmetric attention (none in the MRI path)
    "resblock_updown": False,
    "conv_resample": True,
    "use_checkpoint": False,  # activation checkpointing per block: less memory, ~30 % more compute
}

# Architecture presets (the variant and the M2Diff-specific switches keep their defaults unless given).
PRESETS: dict[str, dict[str, Any]] = {
    # Paper / official code at 256²: 268.99 M parameters (V6), 124.05 M (V1).
    "paper-256": {
        "image_size": 256,
        "model_channels": 128,
        "channel_mult": [1, 1, 2, 2, 4, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [16, 8],
        "num_heads": 4,
        "dropout": 0.2,
    },
    # Official code's layout at 128².
    "paper-128": {
        "image_size": 128,
        "model_channels": 128,
        "channel_mult": [1, 1, 2, 3, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [16, 8],
        "num_heads": 4,
        "dropout": 0.2,
    },
    # The official code's layout at 64² (64 channels, attention at 16 and 8): 48.99 M parameters (V6), the network
    # benchmarks/bench_training.py times against the official implementation (facts.md §1).
    "official-64": {
        "image_size": 64,
        "model_channels": 64,
        "channel_mult": [1, 2, 3, 4],
        "num_res_blocks": 2,
        "attention_resolutions": [16, 8],
        "num_heads": 4,
        "dropout": 0.2,
    },
    # Small enough to train in minutes on 2 CPU cores on the 4 mm / 64³ demo cohort that the README's main job
    # builds (at 128² one training step of a 4-level variant took ~2 s on 2 cores: too slow for a minutes-long demo).
    "demo": {
        "image_size": 64,
        "model_channels": 32,
        "channel_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [8],
        "num_heads": 4,
        "dropout": 0.0,
    },
}


def register_network(name: str, builder: NetworkBuilder) -> None:
    """Make ``build_network({"name": name, ...})`` call ``builder(config)``; a later registration replaces it."""
    if not name or not callable(builder):
        raise ValueError("register_network needs a name and a callable builder(config) -> nn.Module")
    _REGISTRY[name] = builder


def registered_networks() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """Build the network named by ``config["name"]`` (default ``"m2diff"``); ``net.config`` is the resolved dict."""
    if not isinstance(config, Mapping):
        raise ValueError(f"network config must be a dict, got {type(config).__name__}")
    name = str(config.get("name", "m2diff"))
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__package__}.{name}":
                raise
    if name not in _REGISTRY:
        raise ValueError(f"unknown network {name!r}; registered: {list(registered_networks())}")
    net = _REGISTRY[name](config)
    if not isinstance(getattr(net, "config", None), dict):
        net.config = copy.deepcopy(dict(config))
    net.config.setdefault("name", name)
    return net


def _as_int_list(key: str, value: Any) -> list[int]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    try:
        return [int(v) for v in value]
    except (TypeError, ValueError) as err:
        raise ValueError(f"network config {key!r} must be a list of integers, got {value!r}") from err


def resolve_m2diff_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults ← preset (``config["preset"]``, default "paper-256") ← ``config``; validated, JSON-friendly."""
    unknown = set(config) - set(M2DIFF_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown m2diff config keys {sorted(unknown)}; allowed: {sorted(M2DIFF_DEFAULTS)}")
    preset = config.get("preset", M2DIFF_DEFAULTS["preset"])
    if preset not in PRESETS:
        raise ValueError(f"unknown m2diff preset {preset!r}; choose one of {sorted(PRESETS)}")
    resolved = {**copy.deepcopy(M2DIFF_DEFAULTS), **copy.deepcopy(PRESETS[preset]), **copy.deepcopy(dict(config))}
    resolved["name"] = "m2diff"
    resolved["variant"] = str(resolved["variant"]).upper()
    if resolved["variant"] not in VARIANTS:
        raise ValueError(f"unknown M2Diff variant {resolved['variant']!r}; expected one of {VARIANTS}")
    if resolved["output_mode"] not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {resolved['output_mode']!r}")
    for key in ("channel_mult", "attention_resolutions"):
        resolved[key] = _as_int_list(key, resolved[key])
    for key in ("image_size", "model_channels", "num_res_blocks", "num_heads"):
        resolved[key] = int(resolved[key])
    resolved["dropout"] = float(resolved["dropout"])
    for key in (
        "learn_sigma",
        "use_scale_shift_norm",
        "mri_attention",
        "resblock_updown",
        "conv_resample",
        "use_checkpoint",
    ):
        resolved[key] = bool(resolved[key])
    if resolved["variant"] == "V5" and resolved["mri_dropout"] is None:
        resolved["mri_dropout"] = V5_DEFAULT_MRI_DROPOUT
    if resolved["mri_dropout"] is not None:
        resolved["mri_dropout"] = float(resolved["mri_dropout"])
    return resolved


def build_m2diff(config: Mapping[str, Any]) -> nn.Module:
    """Builder for ``name == "m2diff"``: any ablation variant V1..V6 of the paper's Table IV."""
    resolved = resolve_m2diff_config(config)
    kwargs = {k: v for k, v in resolved.items() if k not in ("name", "preset", "variant")}
    net = build_m2diff_variant(resolved["variant"], **kwargs)
    net.config = resolved
    return net


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on ``meta``-device modules)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


register_network("m2diff", build_m2diff)
