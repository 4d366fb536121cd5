"""The exported bundle's ``docs/README.md`` (a model card) and the evaluation summary it quotes.

The card says what the model is, what it was trained on (the checkpoint's data config and, when the training
manifest is still readable at export time, its provenance), how it was evaluated (``--metrics``), what it is for
(research only) and its limits, and how to run it — everything a reader of the exported folder needs without the
repository.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2diff_monai.data.manifest import LIST_KEYS, manifest_provenance
from m2diff_monai.errors import InputError

MAX_TABLE_ROWS = 40


# ------------------------------------------------------------------------------------------------ metrics
def load_metrics(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """An evaluation summary (``.json`` or ``.csv``) as ``(table rows, flat {name: number})``.

    CSV: every row is a table row; numeric cells become ``eval_metrics`` entries named ``<first cell>/<column>``
    (or ``<column>`` for a one-row table). JSON: a list of row objects (like CSV), or an object whose numeric
    leaves are the metrics (nested keys joined with ``/``; a top-level ``"metrics"`` or ``"summary"`` object is
    used when present).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("metrics summary does not exist", path=path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="") as fh:
                rows = [dict(r) for r in csv.DictReader(fh)]
        elif suffix == ".json":
            content = json.loads(path.read_text())
            if isinstance(content, dict):
                inner = next(
                    (content[k] for k in ("metrics", "summary") if isinstance(content.get(k), (dict, list))), content
                )
                content = inner
            if isinstance(content, dict):
                flat = _flatten_numbers(content)
                return [{"metric": k, "value": v} for k, v in flat.items()], flat
            if not isinstance(content, list) or not all(isinstance(r, dict) for r in content):
                raise ValueError("expected an object or a list of row objects")
            rows = [dict(r) for r in content]
        else:
            raise InputError("metrics summary must be a .csv or .json file", path=path)
    except (OSError, ValueError, csv.Error) as err:
        raise InputError(f"cannot read the metrics summary ({err})", path=path) from None
    if not rows:
        raise InputError("metrics summary has no rows", path=path)
    return rows, _row_numbers(rows)


# m2diff-evaluate's summary.csv has ~70 columns (mean/std/n per metric, region and 2D orientation): the card shows
# these, as mean ± std; metadata.json's eval_metrics keeps every number.
HEADLINE_METRICS = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("nmse", "NMSE"), ("lpips", "LPIPS"), ("bias", "bias"))


def headline_metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The card's metrics table: for m2diff-evaluate summaries (``<metric>_mean``/``_std`` columns) method,
    subjects and ``mean ± std`` of PSNR, SSIM, NMSE, LPIPS and mean bias; any other table unchanged."""
    present = [(key, label) for key, label in HEADLINE_METRICS if any(f"{key}_mean" in row for row in rows)]
    if not present:
        return rows
    out = []
    for row in rows:
        first = next(iter(row))
        entry: dict[str, Any] = {"method": row.get("method", row[first]), "subjects": row.get("subjects", "")}
        for key, label in present:
            mean, std = _number(row.get(f"{key}_mean")), _number(row.get(f"{key}_std"))
            entry[label] = "" if mean is None else f"{mean:.4g}" + ("" if std is None else f" ± {std:.2g}")
        out.append(entry)
    return out


PREDICTIONS_SUMMARY = "predictions.json"  # m2diff-infer's cohort summary (inference/cohort.py SUMMARY_NAME)


def evaluated_samplers(metrics: str | Path) -> list[dict[str, Any]]:
    """How each evaluated method's predictions were sampled, for the card: one row per method of the evaluation's
    ``run.json`` (next to ``summary.csv``, or the file itself) whose prediction folder still holds m2diff-infer's
    ``predictions.json``. Baselines and folders that are gone are left out; an unreadable record gives no rows
    (the card then only shows the metrics)."""
    path = Path(metrics)
    run_json = path if path.name == "run.json" else path.with_name("run.json")
    try:
        predictions = json.loads(run_json.read_text()).get("predictions") or {}
    except (OSError, ValueError, AttributeError):
        return []
    rows = []
    for method, folder in predictions.items():
        candidates = [Path(folder), run_json.parent / folder]
        record_path = next((c / PREDICTIONS_SUMMARY for c in candidates if (c / PREDICTIONS_SUMMARY).is_file()), None)
        if record_path is None:
            continue
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        settings = record.get("settings") or {}
        steps = settings.get("steps")
        rows.append(
            {
                "method": method,
                "sampler": settings.get("sampler"),
                "steps": "all" if steps is None else steps,
                "eta": settings.get("eta"),
                "start_step": "none" if settings.get("start_step") is None else settings.get("start_step"),
                "weights": record.get("weights"),
                "checkpoint": record.get("checkpoint"),
            }
        )
    return rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten_numbers(value, f"{name}/"))
        elif _number(value) is not None:
            out[name] = _number(value)
    return out


def _row_numbers(rows: list[dict[str, Any]]) -> dict[str, float]:
    columns = list(rows[0])
    label = columns[0] if columns and _number(rows[0][columns[0]]) is None else None
    out: dict[str, float] = {}
    for i, row in enumerate(rows):
        head = str(row[label]) if label is not None else (str(i) if len(rows) > 1 else "")
        for column in columns:
            if column == label:
                continue
            number = _number(row.get(column))
            if number is not None:
                out[f"{head}/{column}" if head else column] = number
    return out


def markdown_table(rows: list[dict[str, Any]], limit: int = MAX_TABLE_ROWS) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def cell(value: Any) -> str:
        number = _number(value)
        if number is not None and not isinstance(value, int):
            return f"{number:.4g}"
        return str("" if value is None else value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"\n({len(rows) - limit} more rows in the summary file)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- training data
def read_manifest_provenance(manifest: str | Path | None, search_roots: list[Path]) -> dict[str, Any] | None:
    """``{"path", "name", "description", "provenance", "counts"}`` of the training manifest if it can be found
    (as given, or relative to one of ``search_roots``); None otherwise."""
    if not manifest:
        return None
    candidates = [Path(str(manifest))]
    if not candidates[0].is_absolute():
        candidates += [root / str(manifest) for root in search_roots]
    for path in candidates:
        if path.is_file():
            content = manifest_provenance(path)
            if content is None:
                return None
            counts = {k: len(content[k]) for k in LIST_KEYS if isinstance(content.get(k), list)}
            return {
                "path": str(manifest),
                "name": content.get("name"),
                "description": content.get("description"),
                "provenance": content.get("provenance") or {},
                "counts": counts,
            }
    return None


def describe_training_data(data_config: Mapping[str, Any], manifest_info: Mapping[str, Any] | None) -> str:
    """One paragraph: which cohort (e.g. "the simulated demo cohort"), its size and where that is recorded."""
    manifest = data_config.get("manifest")
    if manifest_info is None:
        if not manifest:
            return "The checkpoint does not record its training data."
        return (
            f"Trained on the cohort of manifest `{manifest}` (not readable at export time, so its provenance "
            "is not quoted here)."
        )
    prov = manifest_info.get("provenance") or {}
    notes = str(prov.get("notes") or "").strip()
    counts = manifest_info.get("counts") or {}
    demo = "demo" in str(manifest_info.get("name") or "").lower() or "demo cohort" in notes.lower()
    lead = "Trained on the simulated demo cohort" if demo else "Trained on the cohort"
    parts = [f"{lead} of manifest `{manifest}`"]
    if manifest_info.get("description"):
        parts[0] += f" ({manifest_info['description']})"
    parts[0] += "."
    if counts:
        parts.append("Manifest items: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".")
    if notes:
        parts.append(notes)
    made = ", ".join(str(prov[k]) for k in ("tool", "version", "created") if prov.get(k))
    if made:
        parts.append(f"Manifest made by {made}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------- the card
def sampler_sentence(defaults: Mapping[str, Any]) -> str:
    """The sampler the exported ``inference.json`` runs by default, in words."""
    if not defaults:
        return "Sampler defaults: see `configs/inference.json`."
    steps = "all" if defaults.get("steps") is None else defaults.get("steps")
    text = (
        f"Sampler defaults (`configs/inference.json` and the checkpoint's stored `inference_defaults`, the "
        f"settings the training run was evaluated with): {defaults.get('sampler', 'ddim')}, {steps} steps"
    )
    if defaults.get("start_step") is not None:
        text += (
            f", starting from the LD PET noised to t = {defaults['start_step']} (truncated start; "
            "`--start_step none` samples from pure noise as the papers do)"
        )
    else:
        text += ", starting from pure noise"
    if defaults.get("samples") not in (None, 1):
        text += f", mean of K = {defaults['samples']} draws"
    if defaults.get("ld_consistency_fwhm") is not None:
        text += (
            f", then the LD PET's band below a Gaussian of FWHM {defaults['ld_consistency_fwhm']:g} mm "
            "(low-frequency consistency; not in the papers; `--ld_consistency_fwhm none` turns it off)"
        )
    return text + ". Any of them can be overridden on the command line."


def _clip_text(clip: Any) -> str:
    if clip is None or clip is False:
        return "no range (unclipped)"
    return (
        f"[{', '.join(f'{float(v):g}' for v in clip)}] (normalized units)"
        if isinstance(clip, (list, tuple))
        else f"`{clip}`"
    )


def render_model_card(
    metadata: Mapping[str, Any],
    export_info: Mapping[str, Any],
    data_text: str,
    preprocessing: Mapping[str, Any],
    metrics_rows: list[dict[str, Any]] | None = None,
    metrics_source: str | None = None,
    evaluated_with: list[dict[str, Any]] | None = None,
) -> str:
    """Markdown model card. ``export_info``: source checkpoint, epoch, iteration, weights, network summary,
    files written, diffusion config."""
    net = dict(metadata.get("network_config") or {})
    diffusion = dict(export_info.get("diffusion_config") or {})
    name = metadata.get("name", "m2diff-monai model")
    variant = f"{net.get('name', '?')} {net.get('variant', '')}".strip()
    steps = diffusion.get("timesteps")
    out_desc = export_info.get("output_description", "")
    lines = [
        f"# {name}",
        "",
        f"Version {metadata.get('version')} — exported by `m2diff-export` (m2diff-monai "
        f"{export_info.get('package_version')}) on {export_info.get('created')}.",
        "",
        "> **Research use only. Not for clinical use**: not a medical device, not validated for diagnosis, "
        "treatment planning or any decision about a patient.",
        "",
        "## Model",
        "",
        str(metadata.get("description", "")),
        "",
        f"- Network: `{variant}` (preset `{net.get('preset', 'custom')}`), "
        f"{export_info.get('parameters', 0):,} parameters, trained at {net.get('image_size')}² slices.",
        f"- Diffusion: {steps} steps, `{diffusion.get('schedule')}` schedule, the network predicts "
        f"`{diffusion.get('model_mean_type')}`, variance `{diffusion.get('model_var_type')}`, x̂0 clipped to "
        f"{_clip_text(diffusion.get('clip_denoised'))} while sampling."
        if export_info.get("is_diffusion", True)
        else "- Direct regression (no diffusion sampling).",
        f"- Weights: **{export_info.get('weights')}** from `{export_info.get('source_checkpoint')}` "
        f"(epoch {export_info.get('epoch')}, iteration {export_info.get('iteration')}).",
        f"- Network output `out`: {out_desc}",
        "",
        "## Training data",
        "",
        data_text,
        "",
        "Preprocessing the model expects (applied by the bundle's inference to a raw NIfTI; frozen into "
        "`models/model.pt` at export):",
        "",
        markdown_table(
            [
                {
                    "parameter": k,
                    "value": "none" if v is None else v,
                    "source": (preprocessing.get("sources") or {}).get(k, ""),
                }
                for k, v in preprocessing.items()
                if k != "sources"
            ]
        ),
        "",
        *(
            [
                "Parameters whose source is `default` were recorded neither by the checkpoint nor by a training "
                "manifest readable at export time: check them against how the model was trained.",
                "",
            ]
            if "default" in (preprocessing.get("sources") or {}).values()
            else []
        ),
        "## Evaluation",
        "",
    ]
    if metrics_rows:
        lines += [
            f"From `{metrics_source}` (given to `m2diff-export --metrics`); also in "
            "`configs/metadata.json` → `eval_metrics` (every column).",
            "",
            markdown_table(headline_metrics(metrics_rows)),
            "",
        ]
        if evaluated_with:
            lines += [
                "Sampler that produced the evaluated predictions (from each prediction folder's "
                f"`{PREDICTIONS_SUMMARY}`; the exported bundle's default is under *How to run*):",
                "",
                markdown_table(evaluated_with),
                "",
            ]
            default = export_info.get("sampler_defaults") or {}
            default_steps = "all" if default.get("steps") is None else default.get("steps")
            differing = [
                r["method"]
                for r in evaluated_with
                if (r["sampler"], r["steps"]) != (default.get("sampler", "ddim"), default_steps)
            ]
            if default and differing:
                lines += [
                    f"**Note:** {', '.join(differing)} was sampled with other settings than the exported "
                    f"default ({default.get('sampler', 'ddim')}, {default_steps} steps): pass the evaluated "
                    "ones to reproduce these numbers.",
                    "",
                ]
        else:
            lines += [
                "The sampler that produced these predictions was not recorded next to the summary (no "
                f"`run.json` with prediction folders holding `{PREDICTIONS_SUMMARY}`).",
                "",
            ]
    else:
        lines += [
            "No evaluation summary was given at export (`m2diff-export --metrics summary.csv|json`). "
            "Evaluate on held-out data of your own site before drawing any conclusion.",
            "",
        ]
    lines += [
        "## Intended use",
        "",
        "Research on MRI-guided low-dose brain PET enhancement: estimating a standard-dose-like PET from a "
        "low-dose PET (and, optionally, a T1-weighted MRI) to study dose reduction. Research only, not for "
        "clinical use.",
        "",
        "## Limits",
        "",
        "- Trained on the data above only; scanners, tracers, dose reduction factors, resolutions and "
        "populations not represented there are out of distribution. A model trained on the simulated demo "
        "cohort demonstrates the pipeline; it says nothing about real patients.",
        "- The output is a sample of a generative model: it can hallucinate or remove small structures "
        "(lesions, hypometabolism). Use `samples > 1` to see the per-voxel spread (`*_std.nii.gz`).",
        "- Intensities are in the LD PET's original units through the training normalization; quantitative "
        "use (SUV, kinetic modelling) is not validated.",
        "- 2D slices in three orientations fused into 3D; inputs must be brain PET (and T1 MRI) that the "
        "intake and registration steps accept.",
        "",
        "## How to run",
        "",
        "Requires the `m2diff-monai` package (which brings MONAI, PyTorch, nibabel, antspyx). From this folder:",
        "",
        "```bash",
        "python -m monai.bundle run inference --config_file configs/inference.json \\",
        "    --ld_pet LD.nii.gz --output PRED.nii.gz [--mri T1.nii.gz] [--steps 50] [--device cuda]",
        "```",
        "",
        sampler_sentence(export_info.get("sampler_defaults") or {}),
        "",
        "From elsewhere add `--bundle_root /path/to/this/folder`. The prediction is a float32 NIfTI on the LD "
        "PET's own grid, in its original units. A cohort preprocessed with `m2diff-preprocess` runs with "
        "`--manifest M.json --out_dir DIR`. `m2diff-infer --checkpoint models/model.pt` works too.",
        "",
        "The denoiser alone (one network call, not the sampler) is `models/model.ts`:",
        "",
        "```python",
        "from monai.data import load_net_with_metadata",
        "net, meta, extra = load_net_with_metadata('models/model.ts', more_extra_files=('inference.json',))",
        "out = net(x_t, t, ld, mri, mri_available)  # shapes and ranges: meta['network_data_format']",
        "```",
        "",
        "## Files",
        "",
        markdown_table([{"file": f, "what": w} for f, w in export_info.get("files", {}).items()]),
        "",
        "## License",
        "",
        "Apache-2.0 (`LICENSE`). " + str(metadata.get("copyright", "")),
        "",
        "## References",
        "",
    ]
    lines += [f"- {r}" for r in metadata.get("references", [])]
    return "\n".join(lines).rstrip() + "\n"


__all__ = [
    "describe_training_data",
    "evaluated_samplers",
    "headline_metrics",
    "load_metrics",
    "markdown_table",
    "read_manifest_provenance",
    "render_model_card",
]
