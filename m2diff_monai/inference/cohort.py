"""Cohort inference: a manifest's items checked and planned, job-array shards, torchrun ranks, and the merge of
their summaries (:func:`m2diff_monai.inference.api.infer_manifest` runs them).

- before any work: the cohort's cubes must have been made like the training data (:func:`check_manifest_matches`;
  a model of unknown normalization takes the manifest's, :func:`with_manifest_normalization`), and every output
  file is planned and checked (:func:`plan_cohort_outputs`);
- ``--shard I/N`` (1-based, as ``m2diff-preprocess run --shard``): the selected subjects are sorted by id and shard
  I takes those at positions ≡ I−1 (mod N). Every shard writes its own ``predictions.shard-I-of-N.json`` under its
  own lock ``.m2diff-infer.shard-I-of-N.lock``, so N shards may share one ``--out-dir``; ``m2diff-infer merge
  --out-dir D`` joins them into ``predictions.json``.
- under ``torchrun`` (``WORLD_SIZE`` > 1): rank r is shard r+1 of WORLD_SIZE (subjects ``sorted[r::WORLD_SIZE]``)
  on its own device ``cuda:LOCAL_RANK`` (CPU when no GPU is visible); after a barrier rank 0 merges.

Sharding never changes a prediction: the sampler is re-seeded from ``--seed`` at the start of every subject
(``predict_volume`` reseeds each draw), so a subject's noise does not depend on which process ran it or what ran
before. With ``--seed none`` (torch's global generator) that no longer holds, and the summaries say so.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m2diff_monai.checkpoint import LoadedModel
from m2diff_monai.errors import InputError
from m2diff_monai.inference.preprocess import TrainingPreprocessing
from m2diff_monai.inference.settings import InferenceSettings
from m2diff_monai.inference.subject import checkpoint_file, output_paths
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json
from preprocessing.normalization import recorded_method

SUMMARY_NAME = "predictions.json"
LOCK_NAME = ".m2diff-infer.lock"
SHARD_SUMMARY = re.compile(r"^predictions\.shard-(\d+)-of-(\d+)\.json$")
# keys of a shard summary that must agree between shards (the device differs by rank and is left out)
AGREEING_KEYS = (
    "tool",
    "version",
    "manifest",
    "split",
    "selected",
    "checkpoint",
    "checkpoint_fingerprint",
    "weights",
    "preprocessing",
)
SETTINGS_NOT_COMPARED = ("device", "progress", "threads")  # precision is compared: it changes the numbers
# a rank that finishes its share early waits at the barrier for the slowest one: the default 30 min is too short
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


# ------------------------------------------------------------------------------- a manifest's cohort
def check_manifest_matches(content: dict, prep: TrainingPreprocessing, manifest: Path) -> None:
    """The cubes must have been made like the training data; only parameters the checkpoint states are checked."""
    params = dict((content.get("provenance") or {}).get("parameters") or {})
    params.setdefault("size", content.get("size"))
    recorded = params.get("spacing")
    if prep.spacing is not None and recorded is not None and not np.allclose(recorded, prep.spacing):
        return  # cubes at another voxel size: prepare_cohort_item prepares the subjects from their source files
    for key in ("size", "normalization", "space"):
        known = prep.sources.get(key) in ("checkpoint", "option")
        recorded = params.get(key)
        if key == "normalization" and recorded is not None:
            try:
                recorded = recorded_method(recorded)  # legacy "paper" = "volume"
            except ValueError as err:
                raise InputError(f"manifest provenance: {err}", path=manifest) from None
        if known and recorded is not None and str(recorded) != str(getattr(prep, key)):
            raise InputError(
                f"manifest was preprocessed with {key}={recorded} but the model was trained with "
                f"{key}={getattr(prep, key)}; preprocess the cohort again with the training settings",
                path=manifest,
            )


def with_manifest_normalization(content: dict, prep: TrainingPreprocessing) -> TrainingPreprocessing:
    """A model whose normalization is known from nowhere (the default) takes the cohort manifest's: with ``slice``
    the per-slice min–max happens at sampling time, so it must be known (the cubes themselves carry their scale)."""
    recorded = ((content.get("provenance") or {}).get("parameters") or {}).get("normalization")
    if recorded is None or prep.sources.get("normalization") != "default":
        return prep
    from dataclasses import replace

    return replace(
        prep, normalization=recorded_method(recorded), sources={**prep.sources, "normalization": "cohort manifest"}
    )


def plan_cohort_outputs(
    manifest: Path,
    content: dict,
    items: list[dict],
    out_dir: Path,
    cfg: InferenceSettings,
    checkpoint: str | Path | LoadedModel,
    summary_name: str = "predictions.json",
) -> list[tuple[str, dict[str, Path]]]:
    """``(subject, output paths)`` per item, checked before any work: subject ids are safe file names, every file
    stays in ``out_dir`` and none is the checkpoint, the manifest or a file the manifest lists."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError("--out-dir exists and is not a folder", path=out_dir)
    inputs = safety.RunInputs([("--checkpoint", checkpoint_file(checkpoint))])
    inputs.add_manifest(manifest, content)
    planned = []
    seen: dict[str, str] = {}
    for item in items:
        sid = safety.check_name(item.get("subject"), "manifest subject id", manifest)
        if sid.casefold() in seen:  # two items would write one prediction (case-insensitive file systems too)
            raise InputError(
                f"manifest subject id {sid!r} repeats {seen[sid.casefold()]!r}: both predictions would be one file",
                path=manifest,
            )
        seen[sid.casefold()] = sid
        paths = output_paths(safety.child(out_dir, f"{sid}.nii.gz", "--out-dir", "subject id"), cfg)
        inputs.check_all(paths.values(), "--out-dir", root=out_dir)
        planned.append((sid, paths))
    inputs.check(out_dir / "predictions.json", "--out-dir")
    if summary_name != "predictions.json":
        inputs.check(out_dir / summary_name, "--out-dir")
    return planned


# ------------------------------------------------------------------------------------ shards and ranks
@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``; ``distributed``: it is a torchrun rank (``local_rank`` set)."""

    index: int = 1
    count: int = 1
    distributed: bool = False
    local_rank: int = 0

    @property
    def whole(self) -> bool:
        return self.count == 1

    @property
    def tag(self) -> str:
        return f"shard-{self.index}-of-{self.count}"

    @property
    def summary_name(self) -> str:
        return SUMMARY_NAME if self.whole else f"predictions.{self.tag}.json"

    @property
    def lock_name(self) -> str:
        return LOCK_NAME if self.whole else f".m2diff-infer.{self.tag}.lock"

    def select(self, items: Sequence[dict]) -> list[dict]:
        """The id-sorted items at positions ≡ index−1 (mod count)."""
        ordered = sorted(items, key=lambda it: str(it.get("subject")))
        return [it for pos, it in enumerate(ordered) if pos % self.count == self.index - 1]


def torchrun_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when this process was started by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1 or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def resolve_shard(shard: str | tuple[int, int] | Shard | None) -> Shard:
    """``--shard I/N`` or the torchrun environment (not both) → :class:`Shard`."""
    from preprocessing.options import parse_shard

    if isinstance(shard, Shard):
        return shard
    try:
        parsed = parse_shard(shard)
    except ValueError as err:
        raise InputError(str(err)) from None
    world = torchrun_world()
    if world is not None:
        if parsed is not None:
            raise InputError(
                "--shard is for job arrays; under torchrun every rank already takes its share "
                "(subjects rank::WORLD_SIZE): drop --shard or run without torchrun"
            )
        rank, size, local_rank = world
        return Shard(rank + 1, size, distributed=True, local_rank=local_rank)
    return Shard() if parsed is None else Shard(*parsed)


def shard_device(device: str, shard: Shard) -> str:
    """Under torchrun ``auto``/``cuda`` mean this rank's own GPU ``cuda:LOCAL_RANK`` (CPU when none is visible)."""
    if not shard.distributed or device not in ("auto", "cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{shard.local_rank % torch.cuda.device_count()}"
    return "cpu" if device == "auto" else device


def checkpoint_fingerprint(path: str | os.PathLike | None) -> dict | None:
    """Content fingerprint of the checkpoint file, so shards of different weights under one name do not merge."""
    if not path or not Path(path).is_file():
        return None
    return safety.fingerprint(path)


def barrier_then_merge(shard: Shard, out_dir: Path) -> dict[str, Any] | None:
    """torchrun: wait for every rank's shard summary, then rank 0 writes ``predictions.json`` (returned there)."""
    import torch.distributed as dist

    own_group = not dist.is_initialized()
    if own_group:  # gloo: a CPU barrier works whatever device the ranks sample on
        dist.init_process_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        dist.barrier()
        merged = merge_shards(out_dir, expected=shard.count) if shard.index == 1 else None
        dist.barrier()  # no rank leaves before the merge is written (a failed merge raises on rank 0 only)
        return merged
    finally:
        if own_group:
            dist.destroy_process_group()


def _shard_files(out_dir: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for path in sorted(out_dir.glob("predictions.shard-*-of-*.json")):
        match = SHARD_SUMMARY.match(path.name)
        if match:
            found[(int(match.group(1)), int(match.group(2)))] = path
    return found


def _comparable(summary: dict) -> dict:
    out = {k: summary.get(k) for k in AGREEING_KEYS}
    out["settings"] = {k: v for k, v in (summary.get("settings") or {}).items() if k not in SETTINGS_NOT_COMPARED}
    return out


def _read_shard_summaries(out_dir: Path, expected: int | None) -> tuple[list[dict], dict, int]:
    """Every shard summary of one complete set I = 1..N, with the files they came from and N."""
    import json

    if not out_dir.is_dir():
        raise InputError("--out-dir is not a folder", path=out_dir)
    found = _shard_files(out_dir)
    if not found:
        raise InputError(
            "no predictions.shard-I-of-N.json here to merge (run m2diff-infer --shard I/N first)", path=out_dir
        )
    counts = sorted({n for _, n in found})
    if len(counts) > 1:
        raise InputError(
            f"shard summaries of different shard counts ({', '.join(f'N={n}' for n in counts)}) are "
            "here; remove the stale ones",
            path=out_dir,
        )
    count = counts[0]
    if expected is not None and count != expected:
        raise InputError(f"expected {expected} shards, found summaries of N={count}", path=out_dir)
    missing = [i for i in range(1, count + 1) if (i, count) not in found]
    if missing:
        raise InputError(
            f"shard(s) {', '.join(f'{i}/{count}' for i in missing)} have no summary yet "
            "(not run, still running or failed)",
            path=out_dir,
        )
    summaries = []
    for i in range(1, count + 1):
        path = found[(i, count)]
        try:
            summaries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise InputError(f"unreadable shard summary ({err})", path=path) from None
    return summaries, found, count


def _check_shards_agree(summaries: list[dict], found: dict, count: int) -> None:
    """Shards must share the manifest, split, selection, checkpoint, weights, preprocessing and settings."""
    reference = _comparable(summaries[0])
    for i, summary in enumerate(summaries[1:], start=2):
        mine = _comparable(summary)
        differing = sorted(k for k in reference if reference[k] != mine[k])
        if "settings" in differing:
            differing.remove("settings")
            differing += [
                f"settings.{k}"
                for k in sorted(set(reference["settings"]) | set(mine["settings"]))
                if reference["settings"].get(k) != mine["settings"].get(k)
            ]
        if differing:
            raise InputError(
                f"shard {i}/{count} disagrees with shard 1/{count} on {', '.join(differing)}; "
                "rerun the odd shard with the same options",
                path=found[(i, count)],
            )


def _predictions_by_subject(
    summaries: list[dict], found: dict, count: int, out_dir: Path
) -> tuple[list[str], dict[str, dict]]:
    """The selection and each selected subject's entry: exactly one shard per subject, its files present."""
    selected = list(summaries[0].get("selected") or [])
    by_subject: dict[str, dict] = {}
    for i, summary in enumerate(summaries, start=1):
        for entry in summary.get("subjects", []):
            sid = entry.get("subject")
            if sid in by_subject:
                raise InputError(f"subject {sid} was predicted by two shards", path=found[(i, count)])
            by_subject[sid] = entry
    absent = [s for s in selected if s not in by_subject]
    extra = sorted(set(by_subject) - set(selected))
    if absent or extra:
        problem = f"missing subject(s) {', '.join(absent)}" if absent else f"unselected subject(s) {', '.join(extra)}"
        raise InputError(f"shards do not cover the selection: {problem}", path=out_dir)
    for sid in selected:
        for key, file in by_subject[sid]["files"].items():
            if not Path(file).is_file():
                raise InputError(f"subject {sid}: its {key} file is gone", path=file)
    return selected, by_subject


def merge_shards(out_dir: str | os.PathLike, expected: int | None = None) -> dict[str, Any]:
    """Join ``OUT_DIR/predictions.shard-I-of-N.json`` (I = 1..N) into ``OUT_DIR/predictions.json``.

    Refuses (:class:`InputError`, nothing written) when shard summaries of different N are present, a shard is
    missing, the shards disagree on the manifest, split, subject selection, checkpoint (path and content),
    weights, preprocessing or sampling settings, a selected subject has no prediction (or two), or a listed
    prediction file is gone. Subjects are listed in the order an unsharded run lists them.
    """
    out_dir = Path(out_dir)
    summaries, found, count = _read_shard_summaries(out_dir, expected)
    _check_shards_agree(summaries, found, count)
    selected, by_subject = _predictions_by_subject(summaries, found, count, out_dir)
    merged = {k: v for k, v in summaries[0].items() if k not in ("subjects", "seconds", "shard", "selected")}
    devices = sorted({str(s["settings"].get("device")) for s in summaries})  # a string, as in an unsharded run
    merged["settings"] = {**summaries[0]["settings"], "device": ",".join(devices)}
    merged["subjects"] = [by_subject[s] for s in selected]
    merged["shards"] = [
        {
            "shard": f"{i}/{count}",
            "summary": found[(i, count)].name,
            "seconds": s.get("seconds"),
            "device": s["settings"].get("device"),
        }
        for i, s in enumerate(summaries, start=1)
    ]
    merged["seconds"] = max(float(s.get("seconds") or 0.0) for s in summaries)
    with safety.output_lock(out_dir, "m2diff-infer merge", "--out-dir", LOCK_NAME):  # not while an unsharded run writes
        save_json(out_dir / SUMMARY_NAME, merged)
    return merged


__all__ = [
    "Shard",
    "barrier_then_merge",
    "check_manifest_matches",
    "merge_shards",
    "plan_cohort_outputs",
    "resolve_shard",
    "shard_device",
    "torchrun_world",
    "with_manifest_normalization",
]
