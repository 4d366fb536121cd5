"""The exported configs: the source bundle's own configs with paths and defaults rewritten, nothing assembled.

A source ``inference.json`` (``bundles/m2diff``, ``bundles/mfdiff``) already declares every part a MONAI bundle
has: ``network_def`` and ``model`` (``m2diff_monai.checkpoint.bundle_network`` / ``bundle_model``),
``preprocessing`` / ``inferer`` / ``postprocessing`` (the ids MONAI Deploy reads) and the ``inference`` entry run
by ``run``. Export changes values only (:data:`REWRITTEN_IDS`):

- ``bundle_root`` → ``"."`` and ``checkpoint`` → ``$@bundle_root + '/models/model.pt'``;
- ``network_config`` / ``diffusion_config`` / ``data_config`` (null in the source: taken from the checkpoint) →
  the checkpoint's configs, preprocessing frozen, so the folder runs without the checkpoint or the manifest;
- ``sampling_defaults`` ← the checkpoint's stored ``inference_defaults`` (their top-level keys set to null so they
  apply), and ``--set`` values into the top-level settings keys (which win).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import m2diff_monai
from m2diff_monai.errors import InputError

MODEL_PT = "models/model.pt"
EXPORTED_ROOT = "."
CHECKPOINT_EXPR = f"$@bundle_root + '/{MODEL_PT}'"
# the source's null config ids → the checkpoint config's keys that fill them
EMBEDDED_CONFIGS = {"network_config": "network", "diffusion_config": "diffusion", "data_config": "data"}
# what a source inference.json must declare to be exported (the structure both share)
REQUIRED_IDS = (
    "bundle_root",
    "checkpoint",
    *EMBEDDED_CONFIGS,
    "network_def",
    "model",
    "preprocessing",
    "inferer",
    "postprocessing",
    "inference",
)
# the ids whose value export may change besides the top-level inference settings (``InferenceSettings`` fields:
# --set, stored defaults); every other id is copied as it is (tests/test_bundle_shape.py)
REWRITTEN_IDS = ("bundle_root", "checkpoint", *EMBEDDED_CONFIGS, "sampling_defaults")


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


def rewrite_config(config: Any, loaded: Mapping[str, Any]) -> Any:
    """An optional config (``train.json``, ``evaluate.json``, ...) for the exported folder; text (``logging.conf``)
    is copied as it is."""
    return config if isinstance(config, str) else _rewrite_common(config, loaded)


def check_sampler_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated inference-setting overrides for the exported ``inference.json`` (e.g. ``{"start_step": 200}``):
    keys must be ``InferenceSettings`` fields and the values must pass its checks; ``InputError`` otherwise."""
    from m2diff_monai.inference.settings import SETTING_KEYS, InferenceSettings

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
    """The source ``inference.json`` made self-contained by rewriting :data:`REWRITTEN_IDS` (module docstring);
    the structure (ids, ``_target_``\\ s, references) is the source's. InputError for a source that does not
    declare :data:`REQUIRED_IDS`."""
    from m2diff_monai.inference.defaults import SAMPLING_DEFAULTS_KEY, STATED_NULLS

    missing = [key for key in REQUIRED_IDS if key not in config]
    if missing:
        raise InputError(
            f"the source inference.json does not declare {', '.join(missing)}; declare them as "
            "bundles/m2diff/inference.json does (docs/export.md)"
        )
    out = copy.deepcopy(dict(config))
    out["bundle_root"] = EXPORTED_ROOT
    out["checkpoint"] = CHECKPOINT_EXPR
    for config_id, key in EMBEDDED_CONFIGS.items():
        out[config_id] = copy.deepcopy(loaded["config"][key])
    stored = dict(loaded["config"].get("inference_defaults") or {})
    if stored:
        block = dict(out.get(SAMPLING_DEFAULTS_KEY) or {})
        for key, value in stored.items():
            block[key] = STATED_NULLS.get(key, value) if value is None else value
            if key not in (sampler_defaults or {}):
                out[key] = None
        out[SAMPLING_DEFAULTS_KEY] = block
    out.update(copy.deepcopy(dict(sampler_defaults or {})))
    entry = out["inference"]
    if isinstance(entry, dict):  # a source bundle that predates a setting still passes it to the entry point
        for key in [*(sampler_defaults or {}), *stored]:
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
    return {
        k: getattr(settings, k) for k in ("sampler", "steps", "eta", "start_step", "samples", "ld_consistency_fwhm")
    }


def exported_checkpoint(loaded: Mapping[str, Any], created: str) -> dict[str, Any]:
    """``models/model.pt``: the project checkpoint format with only the chosen weights (as ``network``)."""
    from m2diff_monai.checkpoint import new_checkpoint

    return new_checkpoint(
        loaded["state"],
        copy.deepcopy(loaded["config"]),
        ema_state=None,
        epoch=loaded["epoch"],
        iteration=loaded["iteration"],
        export={
            "weights": loaded["weights"],
            "source_checkpoint": loaded["path"].name,
            "source_checkpoint_sha256": loaded["sha256"],
            "created": created,
            "tool": f"m2diff-export {m2diff_monai.__version__}",
        },
    )


__all__ = [
    "CHECKPOINT_EXPR",
    "EMBEDDED_CONFIGS",
    "EXPORTED_ROOT",
    "MODEL_PT",
    "REQUIRED_IDS",
    "REWRITTEN_IDS",
    "check_sampler_defaults",
    "effective_sampler",
    "exported_checkpoint",
    "rewrite_config",
    "rewrite_inference_config",
]
