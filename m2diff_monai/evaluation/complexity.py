"""The papers' computational-complexity table: parameters, training seconds per epoch, inference seconds per subject.

Where each number comes from (the first that exists; ``--timings`` values override):

- **Parameters**: the checkpoint's ``config["network"]`` rebuilt with ``networks.factory.build_network`` on the
  ``meta`` device (no memory, no weights read) and counted; if that fails, the tensors of its state dict.
  The checkpoint is ``--checkpoint METHOD=CKPT``, else the ``checkpoint`` that ``m2diff-infer`` recorded in the
  prediction folder's ``predictions.json``.
- **Training s/epoch**: the training run folder is the checkpoint's folder (its parent when that is
  ``checkpoints/``, the bundles' layout). (1) ignite's ``Epoch[N] Complete. Time taken: HH:MM:SS.sss`` lines of the
  trainer in any ``*.log``/``*.txt`` there (the bundles log to stdout; redirect it to a file to keep them) — mean
  over epochs, the last run of an epoch counting; (2) else the TensorBoard ``train_loss`` events (one per
  iteration, ``TensorBoardStatsHandler``): wall-clock seconds per iteration × iterations per epoch (the checkpoint's
  ``iteration / epoch``). Both include the per-epoch validation and checkpointing, as the papers' wall-clock does.
- **Inference s/subject**: ``predictions.json`` of the prediction folder (``m2diff-infer`` cohort mode): mean over
  subjects of sampling + writing seconds (the one-off model load excluded), with the device it ran on.
- ``--timings METHOD=FILE``: a JSON file with any of ``parameters``, ``train_seconds_per_epoch``,
  ``inference_seconds_per_subject``, ``device``, ``notes`` — or an ``m2diff-infer`` ``predictions.json`` /
  ``--summary`` file.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m2diff_monai.errors import InputError

EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")
TRAIN_TAG = "train_loss"
TIMING_KEYS = ("parameters", "train_seconds_per_epoch", "inference_seconds_per_subject", "device", "notes")
MAX_LOG_BYTES = 200 * 1024 * 1024
PAPER_REFERENCE = (
    "Paper (M2Diff, §III-F; NVIDIA A40, 256², batch 1): M2Diff 268.99 M parameters, 1217.84 s/epoch, ≈ 88 s/subject; "
    "IDDPM 124.05 M, 429.46 s/epoch, 40 s/subject."
)


def parameters_from_checkpoint(path: str | Path) -> dict[str, Any]:
    """``{"parameters", "network", "epoch", "iteration", "source"}`` of a project checkpoint."""
    import torch

    from m2diff_monai.checkpoint import RAW, read_checkpoint, select_weights
    from m2diff_monai.networks.factory import build_network, count_parameters

    path = Path(path)
    checkpoint = read_checkpoint(path, mmap=True)  # the config and counters; the weights are mapped, not read
    net_config = checkpoint["config"]["network"]
    network = {k: net_config.get(k) for k in ("name", "preset", "variant", "image_size") if k in net_config}
    try:
        with torch.device("meta"):
            parameters = count_parameters(build_network(net_config))
        source = "network config (build_network)"
    except Exception:
        state = select_weights(checkpoint, RAW, fallback=True, path=path)[1]
        parameters = sum(int(v.numel()) for v in state.values() if hasattr(v, "numel"))
        source = "state dict tensors"
    return {
        "parameters": int(parameters),
        "network": network,
        "epoch": checkpoint.get("epoch"),
        "iteration": checkpoint.get("iteration"),
        "source": source,
    }


def run_folder(checkpoint: str | Path) -> Path:
    folder = Path(checkpoint).resolve().parent
    return folder.parent if folder.name == "checkpoints" else folder


def seconds_from_text_logs(folder: str | Path) -> dict[str, Any] | None:
    """Mean of the trainer's ignite ``Epoch[N] Complete. Time taken`` lines under ``folder`` (evaluator lines
    skipped; a repeated epoch — a resumed run — counts once, its last time)."""
    per_epoch: dict[int, float] = {}
    sources = []
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix not in (".log", ".txt") or not path.is_file() or path.stat().st_size > MAX_LOG_BYTES:
            continue
        found = False
        with open(path, errors="replace") as fh:
            for line in fh:
                match = EPOCH_LINE.search(line)
                if match is None or "Evaluator" in line:
                    continue
                h, m, s = int(match.group(2)), int(match.group(3)), float(match.group(4))
                per_epoch[int(match.group(1))] = 3600 * h + 60 * m + s
                found = True
        if found:
            sources.append(str(path))
    if not per_epoch:
        return None
    return {
        "train_seconds_per_epoch": float(statistics.fmean(per_epoch.values())),
        "epochs": len(per_epoch),
        "source": f"ignite epoch times in {', '.join(sources)}",
    }


def seconds_from_tensorboard(folder: str | Path, iterations_per_epoch: float | None) -> dict[str, Any] | None:
    """Wall-clock seconds per iteration from the ``train_loss`` events × iterations per epoch."""
    files = sorted(p for p in Path(folder).rglob("events.out.tfevents.*") if p.is_file())
    if not files or not iterations_per_epoch:
        return None
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    seconds = steps = 0.0
    for path in files:
        points = []
        try:
            for event in EventFileLoader(str(path)).Load():
                if event.HasField("summary") and any(v.tag == TRAIN_TAG for v in event.summary.value):
                    points.append((int(event.step), float(event.wall_time)))
        except Exception:  # a truncated event file (a killed run) still gives the events before the damage
            pass
        if len(points) >= 2:
            points.sort()
            seconds += points[-1][1] - points[0][1]
            steps += points[-1][0] - points[0][0]
    if steps <= 0:
        return None
    return {
        "train_seconds_per_epoch": seconds / steps * float(iterations_per_epoch),
        "iterations_per_epoch": float(iterations_per_epoch),
        "source": f"TensorBoard '{TRAIN_TAG}' wall times under {folder} × iterations per epoch",
    }


def training_seconds_per_epoch(checkpoint: str | Path, info: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    folder = run_folder(checkpoint)
    found = seconds_from_text_logs(folder)
    if found is not None:
        return found
    info = info or {}
    epoch, iteration = info.get("epoch"), info.get("iteration")
    per_epoch = iteration / epoch if epoch and iteration else None
    return seconds_from_tensorboard(folder, per_epoch)


def read_timings_file(path: str | Path) -> dict[str, Any]:
    """A ``--timings`` file → the :data:`TIMING_KEYS` it gives (m2diff-infer summaries are understood)."""
    path = Path(path)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"timings file is not valid JSON ({err})", path=path) from None
    if not isinstance(content, dict):
        raise InputError("timings file must hold a JSON object", path=path)
    out = {k: content[k] for k in TIMING_KEYS if content.get(k) is not None}
    inferred = inference_from_summary(content)
    if inferred is not None and "inference_seconds_per_subject" not in out:
        out.update(inferred)
    for key in ("parameters", "train_seconds_per_epoch", "inference_seconds_per_subject"):
        if key in out:
            try:
                out[key] = float(out[key])
            except (TypeError, ValueError):
                raise InputError(f"timings file: {key} must be a number, got {out[key]!r}", path=path) from None
    if not out:
        raise InputError(
            f"timings file has none of {', '.join(TIMING_KEYS)} and is not an m2diff-infer summary", path=path
        )
    return out


def inference_from_summary(content: Mapping[str, Any]) -> dict[str, Any] | None:
    """Seconds per subject from an ``m2diff-infer`` summary (cohort ``predictions.json`` or single subject)."""
    device = (content.get("settings") or {}).get("device")
    subjects = content.get("subjects")
    if isinstance(subjects, list) and subjects:
        values = []
        for entry in subjects:
            seconds = entry.get("seconds") if isinstance(entry, dict) else None
            if isinstance(seconds, dict) and "sampling" in seconds:
                values.append(float(seconds["sampling"]) + float(seconds.get("writing", 0.0)))
        if values:
            return {
                "inference_seconds_per_subject": float(statistics.fmean(values)),
                "subjects_timed": len(values),
                "device": device,
            }
    seconds = content.get("seconds")
    if isinstance(seconds, dict) and "sampling" in seconds:
        return {
            "inference_seconds_per_subject": float(seconds["sampling"]) + float(seconds.get("writing", 0.0)),
            "subjects_timed": 1,
            "device": device,
        }
    return None


def _infer_summary(pred_dir: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    if pred_dir is None or not (Path(pred_dir) / "predictions.json").is_file():
        return None, None
    path = Path(pred_dir) / "predictions.json"
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, path
    return (content if isinstance(content, dict) else None), path


def gather_inputs(
    methods: Sequence[str],
    pred_dirs: Mapping[str, Path],
    checkpoints: Mapping[str, Path],
    timings: Mapping[str, Path],
) -> list[dict[str, Any]]:
    """Per method: the checkpoint, the inference summary and the timings file to use; read and checked now so a
    bad ``--checkpoint`` or ``--timings`` fails before any scoring."""
    unknown = sorted((set(checkpoints) | set(timings)) - set(methods))
    if unknown:
        raise InputError(f"--checkpoint/--timings name method(s) {', '.join(unknown)} that have no --pred")
    out = []
    for method in methods:
        summary, summary_path = _infer_summary(pred_dirs.get(method))
        checkpoint = checkpoints.get(method)
        checkpoint_source = "--checkpoint"
        if checkpoint is None and summary and summary.get("checkpoint"):
            candidate = Path(str(summary["checkpoint"]))
            if not candidate.is_absolute() and not candidate.is_file():  # relative to where m2diff-infer ran
                candidate = Path(pred_dirs[method]) / candidate
            if candidate.is_file():
                checkpoint, checkpoint_source = candidate, f"{summary_path} (m2diff-infer)"
        entry: dict[str, Any] = {
            "method": method,
            "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_source": checkpoint_source if checkpoint is not None else None,
        }
        if checkpoint is not None:
            entry["checkpoint_info"] = parameters_from_checkpoint(checkpoint)
        if summary is not None:
            inferred = inference_from_summary(summary)
            if inferred is not None:
                entry["inference"] = {**inferred, "source": str(summary_path)}
        if method in timings:
            entry["timings"] = {**read_timings_file(timings[method]), "source": str(timings[method])}
        out.append(entry)
    return out


def complexity_rows(inputs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: ``parameters``, ``train_seconds_per_epoch``, ``inference_seconds_per_subject``,
    ``device`` and where each came from (None when unknown)."""
    rows = []
    for entry in inputs:
        row: dict[str, Any] = {
            "method": entry["method"],
            "parameters": None,
            "train_seconds_per_epoch": None,
            "inference_seconds_per_subject": None,
            "device": None,
            "network": None,
            "sources": {},
        }
        info = entry.get("checkpoint_info")
        if info:
            row["parameters"] = info["parameters"]
            row["network"] = info["network"]
            row["sources"]["parameters"] = f"{entry['checkpoint']} ({info['source']})"
            training = training_seconds_per_epoch(entry["checkpoint"], info)
            if training:
                row["train_seconds_per_epoch"] = training["train_seconds_per_epoch"]
                row["sources"]["train_seconds_per_epoch"] = training["source"]
        if entry.get("inference"):
            row["inference_seconds_per_subject"] = entry["inference"]["inference_seconds_per_subject"]
            row["device"] = entry["inference"].get("device")
            row["sources"]["inference_seconds_per_subject"] = entry["inference"]["source"]
        for key, value in (entry.get("timings") or {}).items():
            if key in TIMING_KEYS:
                row[key] = value
                if key != "notes":
                    row["sources"][key] = entry["timings"]["source"]
        rows.append(row)
    return rows


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "parameters":
        return f"{float(value) / 1e6:.2f} M"
    return f"{float(value):.2f}"


def complexity_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "# Computational complexity\n",
        "| method | network | parameters | training s/epoch | inference s/subject | device |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        net = row.get("network") or {}
        name = " ".join(str(net[k]) for k in ("name", "preset", "variant") if net.get(k)) or "—"
        lines.append(
            f"| {row['method']} | {name} | {_fmt(row['parameters'], 'parameters')} | "
            f"{_fmt(row['train_seconds_per_epoch'], 's')} | {_fmt(row['inference_seconds_per_subject'], 's')} "
            f"| {row.get('device') or '—'} |"
        )
    lines.append("")
    if not rows:
        lines.append("No method to describe.\n")
    lines.append(
        "— = unknown: give `--checkpoint METHOD=CKPT` (parameters; training logs next to it) or "
        "`--timings METHOD=FILE` (see docs/evaluation.md). Training s/epoch is wall-clock including "
        "validation; inference s/subject excludes the one-off model load.\n"
    )
    for row in rows:
        for key, source in row["sources"].items():
            lines.append(f"- {row['method']} {key}: {source}")
        if row.get("notes"):
            lines.append(f"- {row['method']} notes: {row['notes']}")
    lines.append(f"\n{PAPER_REFERENCE}\n")
    return "\n".join(lines)


__all__ = [
    "complexity_markdown",
    "complexity_rows",
    "gather_inputs",
    "inference_from_summary",
    "parameters_from_checkpoint",
    "read_timings_file",
    "seconds_from_tensorboard",
    "seconds_from_text_logs",
    "training_seconds_per_epoch",
]
