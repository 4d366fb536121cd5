"""``m2diff-export``: a training checkpoint + a source bundle → a standard, self-contained MONAI bundle folder.

Layout written (MONAI model-zoo convention)::

    OUT/configs/metadata.json        source metadata, updated: version, changelog, versions, network_data_format,
                                     the network/diffusion config, export facts (eval_metrics with --metrics)
    OUT/configs/inference.json       the source's inference.json, same ids, with paths and defaults rewritten so
                                     it runs from OUT alone (:mod:`.configs`): bundle_root ".", checkpoint
                                     models/model.pt, the checkpoint's configs embedded
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

Modules: :mod:`.inputs` (the source bundle, the checkpoint, the license), :mod:`.metadata`, :mod:`.configs`,
:mod:`.torchscript`, :mod:`.model_card`; this one checks the options and writes the folder.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import m2diff_monai
from m2diff_monai.checkpoint import bundle_model, read_checkpoint, write_checkpoint
from m2diff_monai.errors import InputError
from m2diff_monai.export import model_card
from m2diff_monai.export.configs import (
    MODEL_PT,
    check_sampler_defaults,
    effective_sampler,
    exported_checkpoint,
    rewrite_config,
    rewrite_inference_config,
)
from m2diff_monai.export.inputs import (
    OPTIONAL_CONFIGS,
    freeze_preprocessing,
    license_text,
    load_checkpoint_for_export,
    read_source_bundle,
)
from m2diff_monai.export.metadata import build_metadata, find_schema, network_data_format, validate_metadata
from m2diff_monai.export.torchscript import (
    ONNX_MISSING,
    export_onnx,
    onnx_available,
    save_torchscript,
    trace_denoiser,
)
from m2diff_monai.io.atomic import new_staging_folder, publish_folder
from m2diff_monai.io.safety import RunInputs
from m2diff_monai.shipped import resolve_bundle

MODEL_TS = "models/model.ts"
MODEL_ONNX = "models/model.onnx"
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+([.+-][0-9A-Za-z.+-]+)?$")
# What bundles exported before the source inference.json declared its own parts name as their ``model``
# (``m2diff_monai.export.bundle.load_exported_model``): kept so those folders still run.
load_exported_model = bundle_model


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    weights: str
    version: str
    warnings: list[str]


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


def _check_out(
    out: Path, bundle: Path, force: bool, checkpoint: Path | None = None, metrics: Path | None = None
) -> None:
    """``--out`` is replaced as a whole (under ``force``): it must not be, hold, or lie inside an input."""
    if out.resolve() == bundle.resolve() or bundle.resolve() in out.resolve().parents:
        raise InputError("--out must not be the source bundle or a folder inside it", path=out)
    RunInputs([("--bundle", bundle), ("--checkpoint", checkpoint), ("--metrics", metrics)]).check(out, "--out")
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", path=out)
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise InputError(
                "--out exists and is not empty; choose another folder or pass --force to replace it", path=out
            )
        if not _is_export(out):
            raise InputError(
                "--force replaces only an earlier export (configs/metadata.json and models/), and "
                "--out is not one; choose another folder",
                path=out,
            )


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
    ``inference.json`` (e.g. ``{"start_step": 300, "steps": 10}`` for the MFdiff demo). Raises InputError for bad
    input; nothing is left behind on failure."""
    from tqdm.auto import tqdm

    bundle, out = resolve_bundle(bundle), Path(out)
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
        notes.append(
            f"preprocessing {', '.join(defaulted)} not recorded by the checkpoint or a readable training "
            f"manifest ({data.get('manifest') or 'none named'}): froze this package's defaults ({values}); "
            "run the export where the manifest is readable if the model was trained otherwise"
        )
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    bar.update()

    bar.set_postfix_str("configs")
    metadata = build_metadata(configs["metadata.json"], loaded, version, name, created, eval_metrics, onnx)
    validate_metadata(metadata, find_schema(bundle))
    written: dict[str, Any] = {
        "configs/metadata.json": metadata,
        "configs/inference.json": rewrite_inference_config(configs["inference.json"], loaded, sampler_defaults),
    }
    for fname in OPTIONAL_CONFIGS:
        if fname in configs:
            written[f"configs/{fname}"] = rewrite_config(configs[fname], loaded)
    bar.update()

    tmp = new_staging_folder(out)
    try:
        for rel, content in written.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content if isinstance(content, str) else json.dumps(content, indent=4) + "\n")

        bar.set_postfix_str("model.pt")
        (tmp / "models").mkdir(exist_ok=True)
        write_checkpoint(tmp / MODEL_PT, exported_checkpoint(loaded, created))
        reloaded = read_checkpoint(tmp / MODEL_PT)
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
        sampler = effective_sampler(written["configs/inference.json"], loaded["config"].get("inference_defaults"))
        from m2diff_monai.inference.api import warn_untrained_start

        trained = (loaded["config"].get("training") or {}).get("train_max_timestep")
        warn_untrained_start(trained, sampler["start_step"], str(loaded["path"]))
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
            "output_description": metadata["pred_classes"],
            "files": {f: FILE_DESCRIPTIONS.get(f, "") for f in sorted(files)},
            "sampler_defaults": sampler,
            "clip_denoised": diffusion.get("clip_denoised"),
        }
        manifest_info = model_card.read_manifest_provenance(data.get("manifest"), [Path.cwd()])
        card = model_card.render_model_card(
            metadata,
            info,
            model_card.describe_training_data(data, manifest_info),
            {**prep["values"], "spatial_size": prep["spatial_size"], "sources": prep["sources"]},
            metrics_rows,
            None if metrics is None else Path(metrics).name,
            model_card.evaluated_samplers(metrics) if metrics else None,
        )
        (tmp / "docs").mkdir(exist_ok=True)
        (tmp / "docs" / "README.md").write_text(card)
        (tmp / "LICENSE").write_text(license)
        bar.update()

        bar.set_postfix_str("move into place")
        publish_folder(tmp, out)  # an earlier export (force) is removed only once the new one is in place
        bar.update()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return ExportResult(out=out, files=sorted(files), weights=loaded["weights"], version=version, warnings=notes)


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
