"""The exported ``configs/metadata.json``: the source metadata updated with versions, changelog,
``network_data_format`` (what ``models/model.ts`` takes and returns), the model's configs and the export record;
validated against MONAI's metadata schema."""

from __future__ import annotations

import copy
import importlib.metadata
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import m2diff_monai
from m2diff_monai.export.torchscript import INPUT_NAMES, accepts_missing_mri, spatial_multiple
from m2diff_monai.shipped import meta_schema_path


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def output_description(
    network_config: Mapping[str, Any], diffusion: Mapping[str, Any], is_diffusion: bool, out_channels: int
) -> dict[str, str]:
    if not is_diffusion:
        return {"0": "estimated standard-dose PET slice (normalized units; direct regression)"}
    mean = diffusion.get("model_mean_type")
    first = {
        "x0": "estimate of the standard-dose PET slice x0 (normalized units)",
        "eps": "predicted noise epsilon of x_t",
    }.get(str(mean), f"model output ({mean})")
    channels = {"0": first}
    if out_channels == 2:
        channels["1"] = "variance interpolation v in [-1, 1] (IDDPM learned range, log-space)"
    return channels


def network_data_format(
    network: torch.nn.Module, diffusion: Mapping[str, Any], data_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The five traced inputs and the output, with shapes (``"M*n"``: any multiple of the downsampling factor M)
    and value ranges."""
    multiple = spatial_multiple(network)
    spatial = [f"{multiple}*n", f"{multiple}*n"]
    from m2diff_monai.diffusion.clip import MINMAX_NORMALIZATIONS, training_normalization

    intensity = [float(v) for v in (data_config.get("intensity_range") or [0, 1])]
    # shared normalization leaves hot spots above 1 (not clipped): the LD PET's range is open above
    normalization = training_normalization(data_config)
    pet_range = intensity if normalization in MINMAX_NORMALIZATIONS else []
    is_diffusion = bool(getattr(network, "is_diffusion", True))
    timesteps = int(diffusion.get("timesteps", 1000))
    net_config = dict(getattr(network, "config", {}) or {})
    learn_sigma = bool(net_config.get("learn_sigma", (net_config.get("unet") or {}).get("learn_sigma", False)))
    out_channels = int(getattr(network, "out_channels", 2 if learn_sigma else 1))

    def image(modality: str, what: str, value_range: list[float]) -> dict[str, Any]:
        return {
            "type": "image",
            "format": "magnitude",
            "modality": modality,
            "num_channels": 1,
            "spatial_shape": list(spatial),
            "dtype": "float32",
            "value_range": value_range,
            "is_patch_data": False,
            "channel_def": {"0": what},
        }

    ignored = "" if is_diffusion else "; ignored by this regression model"
    return {
        "inputs": {
            "x_t": image("PT", f"noisy standard-dose PET slice at step t (normalized units, unbounded){ignored}", []),
            "t": {
                "type": "tensor",
                "format": "timestep",
                "modality": "n/a",
                "num_channels": 1,
                "spatial_shape": [],
                "dtype": "int64",
                "value_range": [0, timesteps - 1],
                "is_patch_data": False,
                "channel_def": {"0": f"diffusion timestep per sample, original 0..T-1 range (T={timesteps}){ignored}"},
            },
            "ld": image(
                "PT",
                "low-dose PET slice, normalized"
                + ("" if pet_range else " (shared scale: ~1 at the 99.5th brain percentile, hot spots above)"),
                pet_range,
            ),
            "mri": image("MR", "T1-weighted MRI slice, normalized; zeros when unavailable", intensity),
            "mri_available": {
                "type": "tensor",
                "format": "flag",
                "modality": "n/a",
                "num_channels": 1,
                "spatial_shape": [],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {
                    "0": "1 where the sample's MRI is given, 0 where it is not"
                    if accepts_missing_mri(network)
                    else "must be 1: this model needs every sample's MRI"
                },
            },
        },
        "outputs": {
            "out": {
                "type": "image",
                "format": "magnitude",
                "modality": "PT",
                "num_channels": out_channels,
                "spatial_shape": list(spatial),
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": output_description(net_config, diffusion, is_diffusion, out_channels),
            },
        },
    }


def build_metadata(
    source: Mapping[str, Any],
    loaded: Mapping[str, Any],
    version: str,
    name: str | None,
    created: str,
    eval_metrics: Mapping[str, float] | None,
    onnx: bool,
) -> dict[str, Any]:
    meta = copy.deepcopy(dict(source))
    network = loaded["network"]
    config = loaded["config"]
    note = (
        f"exported by m2diff-export from {loaded['path'].name} (epoch {loaded['epoch']}, iteration "
        f"{loaded['iteration']}, {loaded['weights']} weights) on {created[:10]}"
    )
    old = dict(meta.get("changelog") or {})
    if version in old:
        note = f"{old.pop(version)}; {note}"
    meta["version"] = version
    meta["changelog"] = {version: note, **old}
    meta["monai_version"] = _installed_version("monai") or meta.get("monai_version", "")
    meta["pytorch_version"] = torch.__version__.split("+")[0]
    meta["numpy_version"] = _installed_version("numpy") or meta.get("numpy_version", "")
    required = dict(meta.get("required_packages_version") or {})
    required["m2diff-monai"] = m2diff_monai.__version__
    for package in list(required):
        installed = _installed_version(package) if package != "m2diff-monai" else None
        if installed:
            required[package] = installed
    meta["required_packages_version"] = required
    if onnx:
        meta["optional_packages_version"] = {
            **dict(meta.get("optional_packages_version") or {}),
            "onnx": _installed_version("onnx") or "",
        }
    if name:
        meta["name"] = name
    nd = network_data_format(network, config["diffusion"], config["data"])
    meta["network_data_format"] = nd
    channels = nd["outputs"]["out"]["channel_def"]
    meta["pred_classes"] = "; ".join(f"channel {k}: {v}" for k, v in channels.items())
    meta["image_classes"] = (
        "inputs " + ", ".join(INPUT_NAMES) + " (see network_data_format); ld and mri are "
        "slices normalized like the training data"
    )
    meta["data_type"] = "NIfTI volumes (bundle inference); 2D slice tensors (models/model.ts)"
    if eval_metrics:
        meta["eval_metrics"] = dict(eval_metrics)
    meta["network_config"] = copy.deepcopy(config["network"])
    meta["diffusion_config"] = copy.deepcopy(config["diffusion"])
    meta["export"] = {
        "tool": f"m2diff-export {m2diff_monai.__version__}",
        "created": created,
        "source_checkpoint": loaded["path"].name,
        "source_checkpoint_sha256": loaded["sha256"],
        "weights": loaded["weights"],
        "epoch": loaded["epoch"],
        "iteration": loaded["iteration"],
        "torchscript_inputs": list(INPUT_NAMES),
    }
    return meta


def validate_metadata(meta: Mapping[str, Any], schema_path: Path | None) -> None:
    """Validate against the local MONAI schema copy when there is one (what ``verify_metadata`` checks)."""
    if schema_path is None or not schema_path.is_file():
        return
    import jsonschema

    schema = json.loads(schema_path.read_text())
    try:
        jsonschema.validate(instance=json.loads(json.dumps(meta)), schema=schema)
    except jsonschema.ValidationError as err:
        raise RuntimeError(f"exported metadata does not satisfy {schema_path}: {err.message}") from None


def find_schema(bundle: Path) -> Path | None:
    """Beside the source bundle (``bundles/schema`` in a checkout), else the copy an installed wheel ships."""
    for candidate in (bundle / "schema" / "meta_schema.json", bundle.parent / "schema" / "meta_schema.json"):
        if candidate.is_file():
            return candidate
    return meta_schema_path()


__all__ = ["build_metadata", "find_schema", "network_data_format", "output_description", "validate_metadata"]
