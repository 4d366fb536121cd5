"""``m2diff-export``: a training checkpoint + a source bundle → a standard, self-contained MONAI bundle folder.

Layout written (MONAI model-zoo convention)::

    OUT/configs/metadata.json        source metadata, updated: version, changelog, versions, network_data_format,
                                     the network/diffusion config, export facts (eval_metrics with --metrics)
    OUT/configs/inference.json       runs from OUT alone: bundle_root ".", checkpoint models/model.pt, network
                                     built from the embedded config (``network_def``) and loaded by
                                     :func:`load_exported_model`
    OUT/configs/train.json, multi_gpu_train.json, evaluate.json (if present), logging.conf
    OUT/models/model.pt              checkpoint dict in the ARCHITECTURE format holding only the chosen weights
                                     (EMA by default) under "network", "ema": None, and the config with the
                                     preprocessing parameters frozen in; ``torch.load(weights_only=True)``
    OUT/models/model.ts              TorchScript denoiser (x_t, t, ld, mri, mri_available) -> out, with metadata
    OUT/models/model.onnx            (--onnx) the same denoiser in ONNX
    OUT/docs/README.md               model card
    OUT/LICENSE                      Apache-2.0

The folder is built under a temporary name next to OUT and renamed into place only when complete, so a failed
export leaves nothing. An existing non-empty OUT is replaced only with ``force`` and only when it is an earlier
export that holds no input (docs/safety.md).
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import m2diff_monai
from m2diff_monai.errors import InputError
from m2diff_monai.io.safety import RunInputs
from m2diff_monai.export import model_card
from m2diff_monai.export.torchscript import (
    INPUT_NAMES,
    ONNX_MISSING,
    accepts_missing_mri,
    export_onnx,
    onnx_available,
    save_torchscript,
    spatial_multiple,
    trace_denoiser,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PT = "models/model.pt"
MODEL_TS = "models/model.ts"
MODEL_ONNX = "models/model.onnx"
REQUIRED_CONFIGS = ("inference.json", "metadata.json")
OPTIONAL_CONFIGS = ("train.json", "multi_gpu_train.json", "evaluate.json", "logging.conf")
EXPORTED_ROOT = "."
CHECKPOINT_EXPR = f"$@bundle_root + '/{MODEL_PT}'"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")
WEIGHT_CHOICES = ("ema", "raw")


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    weights: str
    version: str
    warnings: list[str]


# ----------------------------------------------------------------------------------------- loading the inputs
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


def _select_weights(checkpoint: Mapping[str, Any], weights: str | None, path: Path) -> tuple[str, dict]:
    """``None``: EMA when the checkpoint has one, else raw. An explicit choice must exist."""
    ema = checkpoint.get("ema")
    raw = checkpoint.get("network")
    has_ema = isinstance(ema, dict) and bool(ema)
    has_raw = isinstance(raw, dict) and bool(raw)
    if weights is None:
        weights = "ema" if has_ema else "raw"
    if weights not in WEIGHT_CHOICES:
        raise InputError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, got {weights!r}")
    if weights == "ema" and not has_ema:
        raise InputError("checkpoint has no EMA weights; export with --weights raw", path=path)
    if weights == "raw" and not has_raw:
        raise InputError("checkpoint has no raw network weights; export with --weights ema", path=path)
    return weights, dict(ema if weights == "ema" else raw)


def load_checkpoint_for_export(checkpoint: str | Path, weights: str | None = None) -> dict[str, Any]:
    """Read and check the checkpoint, rebuild its network with the chosen weights.

    Returns ``{"network", "weights", "state", "config": {"network", "diffusion", "data"}, "epoch", "iteration",
    "path", "sha256"}``; InputError (one line naming the file) for every way the checkpoint can be wrong.
    """
    from m2diff_monai.diffusion import resolve_clip
    from m2diff_monai.inference.checkpoint import read_checkpoint, stored_inference_defaults
    from m2diff_monai.networks.factory import build_network

    path = Path(checkpoint)
    ckpt = _read_checkpoint(path, read_checkpoint)
    weights, state = _select_weights(ckpt, weights, path)
    config = ckpt["config"]
    try:
        network = build_network(config["network"])
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"cannot rebuild the network from the checkpoint's config ({err})", path=path) from None
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{weights} weights do not fit the network in the checkpoint's config ({first})",
                         path=path) from None
    try:
        diffusion = resolve_clip(config.get("diffusion") or {}, config.get("data"))
    except ValueError as err:
        raise InputError(f"invalid diffusion config in the checkpoint ({err})", path=path) from None
    inference_defaults = stored_inference_defaults(config, path)
    network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    return {
        "network": network,
        "weights": weights,
        "state": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "config": {
            "network": copy.deepcopy(dict(getattr(network, "config", None) or config["network"])),
            "diffusion": diffusion,
            "data": copy.deepcopy(dict(config.get("data") or {})),
            "inference_defaults": copy.deepcopy(inference_defaults),
        },
        "epoch": ckpt.get("epoch"),
        "iteration": ckpt.get("iteration"),
        "path": path,
        "sha256": _sha256(path),
    }


def _read_checkpoint(path: Path, reader: Any) -> dict[str, Any]:
    """``inference.checkpoint.read_checkpoint``, with the few torch.load failures it does not map (a text file
    read as a legacy pickle raises KeyError) also turned into one InputError line."""
    try:
        return reader(path)
    except InputError:
        raise
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise InputError(f"cannot read the checkpoint ({type(err).__name__}: {detail})", path=path) from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def freeze_preprocessing(data_config: Mapping[str, Any], image_size: int | None) -> dict[str, Any]:
    """The preprocessing parameters inference will use, resolved now (checkpoint → training manifest provenance
    → defaults) and stored as ``data["preprocessing"]``, so the exported bundle does not need the manifest."""
    from m2diff_monai.inference.preprocess import resolve_preprocessing

    prep = resolve_preprocessing(dict(data_config), {}, image_size)
    frozen = {"size": prep.size, "normalization": prep.normalization, "transform": prep.transform,
              "space": prep.space, "seed": prep.seed,
              "spacing": "native" if prep.spacing is None else list(prep.spacing)}
    return {"values": frozen, "spatial_size": prep.spatial_size, "sources": dict(prep.sources)}


# ------------------------------------------------------------------------------------------------- metadata
def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def output_description(network_config: Mapping[str, Any], diffusion: Mapping[str, Any], is_diffusion: bool,
                       out_channels: int) -> dict[str, str]:
    if not is_diffusion:
        return {"0": "estimated standard-dose PET slice (normalized units; direct regression)"}
    mean = diffusion.get("model_mean_type")
    first = {"x0": "estimate of the standard-dose PET slice x0 (normalized units)",
             "eps": "predicted noise epsilon of x_t"}.get(str(mean), f"model output ({mean})")
    channels = {"0": first}
    if out_channels == 2:
        channels["1"] = "variance interpolation v in [-1, 1] (IDDPM learned range, log-space)"
    return channels


def network_data_format(network: torch.nn.Module, diffusion: Mapping[str, Any],
                        data_config: Mapping[str, Any]) -> dict[str, Any]:
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
        return {"type": "image", "format": "magnitude", "modality": modality, "num_channels": 1,
                "spatial_shape": list(spatial), "dtype": "float32", "value_range": value_range,
                "is_patch_data": False, "channel_def": {"0": what}}

    ignored = "" if is_diffusion else "; ignored by this regression model"
    return {
        "inputs": {
            "x_t": image("PT", f"noisy standard-dose PET slice at step t (normalized units, unbounded){ignored}", []),
            "t": {"type": "tensor", "format": "timestep", "modality": "n/a", "num_channels": 1, "spatial_shape": [],
                  "dtype": "int64", "value_range": [0, timesteps - 1], "is_patch_data": False,
                  "channel_def": {"0": f"diffusion timestep per sample, original 0..T-1 range (T={timesteps})"
                                       f"{ignored}"}},
            "ld": image("PT", "low-dose PET slice, normalized"
                        + ("" if pet_range else " (shared scale: ~1 at the 99.5th brain percentile, hot spots above)"),
                        pet_range),
            "mri": image("MR", "T1-weighted MRI slice, normalized; zeros when unavailable", intensity),
            "mri_available": {"type": "tensor", "format": "flag", "modality": "n/a", "num_channels": 1,
                              "spatial_shape": [], "dtype": "float32", "value_range": [0, 1],
                              "is_patch_data": False,
                              "channel_def": {"0": "1 where the sample's MRI is given, 0 where it is not"
                                              if accepts_missing_mri(network) else
                                              "must be 1: this model needs every sample's MRI"}},
        },
        "outputs": {
            "out": {"type": "image", "format": "magnitude", "modality": "PT", "num_channels": out_channels,
                    "spatial_shape": list(spatial), "dtype": "float32", "value_range": [], "is_patch_data": False,
                    "channel_def": output_description(net_config, diffusion, is_diffusion, out_channels)},
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
    note = (f"exported by m2diff-export from {loaded['path'].name} (epoch {loaded['epoch']}, iteration "
            f"{loaded['iteration']}, {loaded['weights']} weights) on {created[:10]}")
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
        meta["optional_packages_version"] = {**dict(meta.get("optional_packages_version") or {}),
                                             "onnx": _installed_version("onnx") or ""}
    if name:
        meta["name"] = name
    nd = network_data_format(network, config["diffusion"], config["data"])
    meta["network_data_format"] = nd
    meta["pred_classes"] = "channel " + "; channel ".join(f"{k}: {v}" for k, v in nd["outputs"]["out"]["channel_def"].items())
    meta["image_classes"] = ("inputs " + ", ".join(INPUT_NAMES) + " (see network_data_format); ld and mri are "
                             "slices normalized like the training data")
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


def _find_schema(bundle: Path) -> Path | None:
    for candidate in (bundle / "schema" / "meta_schema.json", bundle.parent / "schema" / "meta_schema.json",
                      REPO_ROOT / "bundles" / "schema" / "meta_schema.json"):
        if candidate.is_file():
            return candidate
    return None


# -------------------------------------------------------------------------------------------------- configs
def _rewrite_common(config: dict[str, Any], loaded: Mapping[str, Any]) -> dict[str, Any]:
    """bundle_root → the exported folder; config dicts that describe the model → the embedded ones."""
    out = copy.deepcopy(config)
    if "bundle_root" in out:
        out["bundle_root"] = EXPORTED_ROOT
    if "network_config" in out:
        out["network_config"] = copy.deepcopy(loaded["config"]["network"])
    if "diffusion_config" in out:
        out["diffusion_config"] = copy.deepcopy(loaded["config"]["diffusion"])
    return out


def check_sampler_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated inference-setting overrides for the exported ``inference.json`` (e.g. ``{"start_step": 200}``):
    keys must be ``InferenceSettings`` fields and the values must pass its checks; ``InputError`` otherwise."""
    from m2diff_monai.inference.api import SETTING_KEYS, InferenceSettings

    defaults = dict(defaults or {})
    unknown = sorted(set(defaults) - set(SETTING_KEYS))
    if unknown:
        raise InputError(f"--set: unknown inference settings {unknown}; allowed: {', '.join(SETTING_KEYS)}")
    try:
        InferenceSettings(**{k: v for k, v in defaults.items() if v is not None})
    except (TypeError, ValueError) as err:
        raise InputError(f"--set: {err}") from None
    return defaults


def rewrite_inference_config(
    config: Mapping[str, Any], loaded: Mapping[str, Any], sampler_defaults: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The source ``inference.json`` made self-contained: checkpoint ``$@bundle_root + '/models/model.pt'``,
    the network built from the embedded ``network_config`` (``network_def``) and loaded by
    :func:`load_exported_model`, whose result replaces the checkpoint path given to the inference entry point.
    The checkpoint's stored ``inference_defaults`` (the sampler its training run was evaluated with) go into the
    ``sampling_defaults`` block (their top-level keys are set to null so they apply); ``sampler_defaults``
    (``--set``) replace the literal top-level settings keys (``steps``, ``start_step``, ...) and so win."""
    from m2diff_monai.inference.defaults import SAMPLING_DEFAULTS_KEY, STATED_NULLS

    out = _rewrite_common(dict(config), loaded)
    stored = dict(loaded["config"].get("inference_defaults") or {})
    if stored:
        block = dict(out.get(SAMPLING_DEFAULTS_KEY) or {})
        for key, value in stored.items():
            block[key] = STATED_NULLS.get(key, value) if value is None else value
            if key not in (sampler_defaults or {}):
                out[key] = None
        out[SAMPLING_DEFAULTS_KEY] = block
    out.update(copy.deepcopy(dict(sampler_defaults or {})))
    imports = list(out.get("imports") or [])
    for module in ("$import m2diff_monai.networks.factory", "$import m2diff_monai.export.bundle"):
        if module not in imports:
            imports.append(module)
    out["imports"] = imports
    out["bundle_root"] = EXPORTED_ROOT
    out["checkpoint"] = CHECKPOINT_EXPR
    out["network_config"] = copy.deepcopy(loaded["config"]["network"])
    out["diffusion_config"] = copy.deepcopy(loaded["config"]["diffusion"])
    out["data_config"] = copy.deepcopy(loaded["config"]["data"])
    out["network_def"] = {"_target_": "m2diff_monai.networks.factory.build_network", "config": "@network_config"}
    out["model"] = {
        "_target_": "m2diff_monai.export.bundle.load_exported_model",
        "network": "@network_def",
        "checkpoint": "@checkpoint",
        "diffusion_config": "@diffusion_config",
        "data_config": "@data_config",
        "use_ema": "@use_ema",
    }
    out.setdefault("use_ema", True)
    from m2diff_monai.deploy.runner import deploy_config_items  # MONAI Deploy's ids (docs/export.md)

    out.update(deploy_config_items(out))
    entry = out.get("inference")
    if isinstance(entry, dict):
        if "checkpoint" in entry:
            entry["checkpoint"] = "@model"
        for key in [*(sampler_defaults or {}), *stored]:  # a source bundle that predates a setting still passes it
            entry.setdefault(key, f"@{key}")
        if SAMPLING_DEFAULTS_KEY in out:
            entry.setdefault(SAMPLING_DEFAULTS_KEY, f"@{SAMPLING_DEFAULTS_KEY}")
    return out


def effective_sampler(inference_config: Mapping[str, Any], stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampler an exported ``inference.json`` runs with no option given (its explicit keys > the stored
    defaults > its ``sampling_defaults`` > the package defaults), for the model card."""
    from m2diff_monai.inference.api import resolve_settings, split_bundle_settings

    fallback, explicit = split_bundle_settings(dict(inference_config))
    settings = resolve_settings(None, dict(stored or {}), fallback, **explicit)
    return {k: getattr(settings, k) for k in ("sampler", "steps", "eta", "start_step", "samples", "ld_consistency_fwhm")}


def load_exported_model(
    network: torch.nn.Module,
    checkpoint: str | Path,
    diffusion_config: Mapping[str, Any],
    data_config: Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> Any:
    """What the exported ``inference.json`` hands to the inference entry point: ``network`` (built from the
    embedded config) with the weights of ``checkpoint`` (``models/model.pt``, loaded with ``weights_only=True``),
    as an ``m2diff_monai.inference.checkpoint.LoadedModel``. An exported ``model.pt`` holds one set of weights
    (``"ema": None``); a training checkpoint given instead (``--checkpoint``) gives its EMA when ``use_ema``."""
    from m2diff_monai.diffusion import resolve_clip
    from m2diff_monai.inference.checkpoint import LoadedModel, read_checkpoint, stored_inference_defaults

    path = Path(checkpoint)
    if not path.exists() and path.as_posix().endswith(MODEL_PT):
        raise InputError(f"the exported bundle's {MODEL_PT} is not here; run from the exported bundle folder or pass "
                         "--bundle_root EXPORTED_DIR (or --checkpoint PATH)", path=path)
    ckpt = _read_checkpoint(path, read_checkpoint)
    ema, raw = ckpt.get("ema"), ckpt.get("network")
    weights = "ema" if (use_ema and isinstance(ema, dict) and ema) or not isinstance(raw, dict) else "network"
    state = ema if weights == "ema" else raw
    try:
        network.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"weights do not fit the network of the bundle's network_config ({first})",
                         path=path) from None
    network = network.eval()
    for parameter in network.parameters():
        parameter.requires_grad_(False)
    export = ckpt.get("export") or {}
    data = dict(data_config if data_config is not None else ckpt["config"].get("data") or {})
    return LoadedModel(
        network=network,
        diffusion_config=resolve_clip(dict(diffusion_config), data),
        data_config=data,
        inference_defaults=stored_inference_defaults(ckpt["config"], path),
        network_config=dict(getattr(network, "config", None) or ckpt["config"]["network"]),
        weights=str(export.get("weights", weights)),
        path=str(path),
        epoch=ckpt.get("epoch"),
        iteration=ckpt.get("iteration"),
    )


def exported_checkpoint(loaded: Mapping[str, Any], created: str) -> dict[str, Any]:
    """``models/model.pt``: the ARCHITECTURE checkpoint format with only the chosen weights (as ``network``)."""
    return {
        "network": loaded["state"],
        "ema": None,
        "optimizer": None,
        "scaler": None,
        "epoch": loaded["epoch"],
        "iteration": loaded["iteration"],
        "config": copy.deepcopy(loaded["config"]),
        "export": {"weights": loaded["weights"], "source_checkpoint": loaded["path"].name,
                   "source_checkpoint_sha256": loaded["sha256"], "created": created,
                   "tool": f"m2diff-export {m2diff_monai.__version__}"},
    }


# --------------------------------------------------------------------------------------------------- license
def license_text(bundle: Path) -> str:
    """The source bundle's LICENSE, else the repository's, else the installed distribution's."""
    for candidate in (bundle / "LICENSE", REPO_ROOT / "LICENSE"):
        if candidate.is_file():
            return candidate.read_text()
    try:
        dist = importlib.metadata.distribution("m2diff-monai")
        for name in ("licenses/LICENSE", "LICENSE"):
            text = dist.read_text(name)
            if text:
                return text
    except importlib.metadata.PackageNotFoundError:
        pass
    raise InputError("no LICENSE found (bundle folder, repository root or installed package)", path=bundle)


# ---------------------------------------------------------------------------------------------------- export
FILE_DESCRIPTIONS = {
    "configs/metadata.json": "MONAI bundle metadata: versions, changelog, network_data_format, network config",
    "configs/inference.json": "raw LD PET (+ T1) NIfTI → enhanced NIfTI; runs from this folder",
    "configs/train.json": "training config (give --manifest_file to train or fine-tune)",
    "configs/multi_gpu_train.json": "torchrun overlay for train.json",
    "configs/evaluate.json": "evaluation config",
    "configs/logging.conf": "logging configuration",
    MODEL_PT: "weights + network/diffusion/data config (torch.load(weights_only=True))",
    MODEL_TS: "TorchScript denoiser (x_t, t, ld, mri, mri_available) -> out, with metadata",
    MODEL_ONNX: "ONNX denoiser, dynamic batch/height/width",
    "docs/README.md": "this model card",
    "LICENSE": "Apache-2.0",
}


def _check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise InputError(f"--version must look like X.Y.Z, got {version!r}")
    return version


def _check_out(out: Path, bundle: Path, force: bool, checkpoint: Path | None = None,
               metrics: Path | None = None) -> None:
    """``--out`` is replaced as a whole (under ``force``): it must not be, hold, or lie inside an input."""
    if out.resolve() == bundle.resolve() or bundle.resolve() in out.resolve().parents:
        raise InputError("--out must not be the source bundle or a folder inside it", path=out)
    RunInputs([("--bundle", bundle), ("--checkpoint", checkpoint), ("--metrics", metrics)]).check(out, "--out")
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError("--out exists and is not empty; choose another folder or pass --force to replace it",
                             path=out)
        if not _is_export(out):
            raise InputError("--force replaces only an earlier export (configs/metadata.json and models/), and "
                             "--out is not one; choose another folder", path=out)


def _is_export(folder: Path) -> bool:
    """What an earlier ``m2diff-export`` left: the only non-empty folder ``--force`` may replace."""
    return (folder / "configs" / "metadata.json").is_file() and (folder / "models").is_dir()


def export_bundle(
    bundle: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: str | None = None,
    name: str | None = None,
    version: str | None = None,
    onnx: bool = False,
    metrics: str | Path | None = None,
    force: bool = False,
    check: bool = True,
    progress: bool = False,
    sampler_defaults: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write the exported bundle to ``out`` (see the module docstring). ``weights``: "ema", "raw" or None (EMA
    when the checkpoint has one). ``check``: verify the traced module against the network on other batch and
    image sizes (always on in the CLI). ``sampler_defaults``: inference settings written into the exported
    ``inference.json`` (e.g. ``{"start_step": 200, "steps": 10}`` for the MFdiff demo). Raises InputError for bad
    input; nothing is left behind on failure."""
    from tqdm.auto import tqdm

    bundle, out = Path(bundle), Path(out)
    sampler_defaults = check_sampler_defaults(sampler_defaults)
    if onnx and not onnx_available():
        raise InputError(ONNX_MISSING)
    configs = read_source_bundle(bundle)
    version = _check_version(version or str(configs["metadata.json"].get("version") or "0.1.0"))
    _check_out(out, bundle, force, Path(checkpoint), None if metrics is None else Path(metrics))
    metrics_rows, eval_metrics = model_card.load_metrics(metrics) if metrics else (None, None)
    license = license_text(bundle)
    bar = tqdm(total=6 + int(onnx), desc="m2diff-export", unit="step", disable=not progress)

    bar.set_postfix_str("checkpoint")
    loaded = load_checkpoint_for_export(checkpoint, weights)
    network = loaded["network"]
    net_config, diffusion, data = (loaded["config"][k] for k in ("network", "diffusion", "data"))
    prep = freeze_preprocessing(data, net_config.get("image_size"))
    data["preprocessing"] = dict(prep["values"])
    defaulted = sorted(k for k, source in prep["sources"].items() if source == "default" and k != "seed")
    notes = []
    if defaulted:
        values = ", ".join(f"{k}={prep['values'][k]}" for k in defaulted)
        notes.append(f"preprocessing {', '.join(defaulted)} not recorded by the checkpoint or a readable training "
                     f"manifest ({data.get('manifest') or 'none named'}): froze this package's defaults ({values}); "
                     "run the export where the manifest is readable if the model was trained otherwise")
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    bar.update()

    bar.set_postfix_str("configs")
    metadata = build_metadata(configs["metadata.json"], loaded, version, name, created, eval_metrics, onnx)
    validate_metadata(metadata, _find_schema(bundle))
    written: dict[str, Any] = {"configs/metadata.json": metadata,
                               "configs/inference.json": rewrite_inference_config(configs["inference.json"], loaded,
                                                                                 sampler_defaults)}
    for fname in OPTIONAL_CONFIGS:
        if fname in configs:
            content = configs[fname]
            written[f"configs/{fname}"] = content if isinstance(content, str) else _rewrite_common(content, loaded)
    bar.update()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a bundle folder is shared like any other
        for rel, content in written.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content if isinstance(content, str) else json.dumps(content, indent=4) + "\n")

        bar.set_postfix_str("model.pt")
        (tmp / "models").mkdir(exist_ok=True)
        torch.save(exported_checkpoint(loaded, created), tmp / MODEL_PT)
        reloaded = torch.load(tmp / MODEL_PT, map_location="cpu", weights_only=True)
        if set(reloaded["network"]) != set(loaded["state"]):
            raise RuntimeError(f"{MODEL_PT} did not round-trip")
        bar.update()

        bar.set_postfix_str("TorchScript trace")
        traced = trace_denoiser(network, num_timesteps=int(diffusion.get("timesteps", 1000)), check=check)
        save_torchscript(traced, tmp / MODEL_TS, metadata, written["configs/inference.json"])
        bar.update()

        if onnx:
            bar.set_postfix_str("ONNX")
            export_onnx(network, tmp / MODEL_ONNX, num_timesteps=int(diffusion.get("timesteps", 1000)))
            bar.update()

        bar.set_postfix_str("model card")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        files += ["docs/README.md", "LICENSE"]
        info = {
            "package_version": m2diff_monai.__version__,
            "created": created,
            "parameters": sum(p.numel() for p in network.parameters()),
            "diffusion_config": diffusion,
            "is_diffusion": bool(getattr(network, "is_diffusion", True)),
            "weights": loaded["weights"],
            "source_checkpoint": loaded["path"].name,
            "epoch": loaded["epoch"],
            "iteration": loaded["iteration"],
            "output_description": "; ".join(
                f"channel {k}: {v}" for k, v in metadata["network_data_format"]["outputs"]["out"]["channel_def"].items()),
            "files": {f: FILE_DESCRIPTIONS.get(f, "") for f in sorted(files)},
            "sampler_defaults": effective_sampler(written["configs/inference.json"],
                                                  loaded["config"].get("inference_defaults")),
            "clip_denoised": diffusion.get("clip_denoised"),
        }
        manifest_info = model_card.read_manifest_provenance(data.get("manifest"), [Path.cwd(), REPO_ROOT])
        card = model_card.render_model_card(
            metadata, info, model_card.describe_training_data(data, manifest_info),
            {**prep["values"], "spatial_size": prep["spatial_size"], "sources": prep["sources"]},
            metrics_rows, None if metrics is None else Path(metrics).name,
            model_card.evaluated_samplers(metrics) if metrics else None,
        )
        (tmp / "docs").mkdir(exist_ok=True)
        (tmp / "docs" / "README.md").write_text(card)
        (tmp / "LICENSE").write_text(license)
        bar.update()

        bar.set_postfix_str("move into place")
        _move_into_place(tmp, out)
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(out=out, files=sorted(files), weights=loaded["weights"], version=version, warnings=notes)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path) -> None:
    """``tmp`` becomes ``out``; an existing ``out`` (empty, or replaced under ``force``) is removed only after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(old)
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "ExportResult",
    "build_metadata",
    "export_bundle",
    "exported_checkpoint",
    "freeze_preprocessing",
    "load_checkpoint_for_export",
    "load_exported_model",
    "network_data_format",
    "read_source_bundle",
    "rewrite_inference_config",
]
