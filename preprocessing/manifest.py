"""Stage 8: the MONAI datalist ``data_manifests/NAME.json`` (SPEC "Manifest" + ARCHITECTURE extras).

Keys ``training``/``validation``/``test`` hold 2D slice items, ``volumes`` one item per subject; every path is
relative to the manifest's folder. Every manifest is validated against ``data_manifests/schema.json`` before it is
written (atomically). Note for readers: ``monai.data.load_decathlon_datalist`` turns every string value that names
an existing path into an absolute one — including ``""`` (→ the manifest's folder) — so test ``mri_available``
rather than ``mri``, and resolve ``regions`` (a dict, left untouched by MONAI) against the manifest's folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

import m2diff_monai
from m2diff_monai.io.atomic import save_json

from .split import MANIFEST_KEYS

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "data_manifests" / "schema.json"
LIST_KEYS: tuple[str, ...] = ("training", "validation", "test", "volumes")
PATH_KEYS_SLICE: tuple[str, ...] = ("ld_pet", "sd_pet", "mri")
PATH_KEYS_VOLUME: tuple[str, ...] = (
    "ld_pet", "sd_pet", "mri", "brain_mask", "source_ld_pet", "source_sd_pet", "source_mri", "preprocessed_dir",
    "subject_json",
)  # fmt: skip


@lru_cache(maxsize=1)
def load_schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise FileNotFoundError(f"manifest schema missing: {SCHEMA_PATH}")
    return json.loads(SCHEMA_PATH.read_text())


def validate_manifest(manifest: dict) -> None:
    """Raise ``jsonschema.ValidationError`` when ``manifest`` breaks the schema."""
    jsonschema.validate(manifest, load_schema(), format_checker=jsonschema.FormatChecker())


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def relative_path(path: str | Path | None, base: Path) -> str:
    if path in (None, ""):
        return ""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()


def provenance(parameters: dict, notes: str = "", shard: tuple[int, int] | None = None, **extra: Any) -> dict:
    return {
        "tool": "m2diff-preprocess",
        "version": m2diff_monai.__version__,
        "created": now_iso(),
        "parameters": parameters,
        "notes": notes,
        "shard": list(shard) if shard else None,
        **extra,
    }


def subject_items(record: dict, subject_dir: Path, split: str, manifest_dir: Path) -> tuple[list[dict], dict]:
    """(slice items, volume item) for one processed subject, paths relative to ``manifest_dir``."""
    sid = record["subject"]
    files = record["files"]
    mri_available = int(bool(files.get("mri")))

    def rel(name: str | None) -> str:
        return relative_path(subject_dir / name, manifest_dir) if name else ""

    slice_items = []
    for orientation, entry in record["slices"].items():
        per_mod = entry["files"]
        for n, k in enumerate(entry["indices"]):
            slice_items.append(
                {
                    "ld_pet": rel(per_mod["ld_pet"][n]),
                    "sd_pet": rel(per_mod["sd_pet"][n]) if "sd_pet" in per_mod else "",
                    "mri": rel(per_mod["mri"][n]) if "mri" in per_mod else "",
                    "mri_available": mri_available,
                    "subject": sid,
                    "orientation": orientation,
                    "slice": int(k),
                }
            )
    source = record.get("source", {})
    volume = {
        "subject": sid,
        "split": split,
        "ld_pet": rel(files["ld_pet"]),
        "sd_pet": rel(files.get("sd_pet")),
        "mri": rel(files.get("mri")),
        "brain_mask": rel(files["brain_mask"]),
        "scale": float(record["normalization"]["scale"]),
        "offset": float(record["normalization"]["offset"]),
        "source_ld_pet": relative_path(source.get("ld_pet"), manifest_dir),
        "source_sd_pet": relative_path(source.get("sd_pet"), manifest_dir),
        "source_mri": relative_path(source.get("mri"), manifest_dir),
        "mri_available": mri_available,
        "regions": {name: rel(path) for name, path in sorted(files.get("regions", {}).items())},
        "preprocessed_dir": relative_path(subject_dir, manifest_dir),
        "subject_json": rel("subject.json"),
        "space": record["space"],
        "drf": record.get("drf"),
    }
    return slice_items, volume


def sort_key(item: dict, orientations: list[str]) -> tuple:
    o = item.get("orientation")
    return (item["subject"], orientations.index(o) if o in orientations else -1, item.get("slice", -1))


def build_manifest(
    name: str,
    entries: Iterable[tuple[dict, Path, str]],
    manifest_path: Path,
    prov: dict,
    description: str = "",
) -> dict:
    """Manifest dict from ``(record, subject_dir, split)`` triples; items sorted by subject, orientation, slice."""
    manifest_dir = Path(manifest_path).resolve().parent
    lists: dict[str, list[dict]] = {k: [] for k in LIST_KEYS}
    params = prov.get("parameters", {})
    orientations = list(params.get("orientations", []))
    for record, subject_dir, split in entries:
        slices, volume = subject_items(record, Path(subject_dir), split, manifest_dir)
        lists[MANIFEST_KEYS[split]].extend(slices)
        lists["volumes"].append(volume)
    for key in LIST_KEYS:
        lists[key].sort(key=lambda it: sort_key(it, orientations))
    return {
        "name": name,
        "description": description or f"m2diff-monai preprocessed data ({len(lists['volumes'])} subjects)",
        "space": params.get("space", "pet"),
        "size": int(params.get("size", 256)),
        "orientations": orientations,
        **lists,
        "provenance": prov,
    }


def write_manifest(path: Path, manifest: dict) -> Path:
    validate_manifest(manifest)
    return save_json(path, manifest)


def read_manifest(path: Path) -> dict:
    manifest = json.loads(Path(path).read_text())
    validate_manifest(manifest)
    return manifest


def rebase(manifest: dict, from_dir: Path, to_dir: Path) -> dict:
    """Rewrite every relative path of ``manifest`` (written in ``from_dir``) to be relative to ``to_dir``."""
    from_dir, to_dir = Path(from_dir).resolve(), Path(to_dir).resolve()
    if from_dir == to_dir:
        return manifest

    def move(p: str) -> str:
        return relative_path(from_dir / p, to_dir) if p else ""

    out = dict(manifest)
    for key in ("training", "validation", "test"):
        out[key] = [{**it, **{k: move(it[k]) for k in PATH_KEYS_SLICE if k in it}} for it in manifest[key]]
    out["volumes"] = [
        {
            **it,
            **{k: move(it[k]) for k in PATH_KEYS_VOLUME if k in it},
            "regions": {n: move(p) for n, p in it.get("regions", {}).items()},
        }
        for it in manifest["volumes"]
    ]
    return out
