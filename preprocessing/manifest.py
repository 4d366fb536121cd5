"""Stage 8: build the MONAI datalist ``data_manifests/NAME.json`` from processed subjects (SPEC "Manifest" +
ARCHITECTURE extras).

Only the preprocessing-specific part lives here: turning a subject's record into slice items and a volume item, and
the order of items. Reading, validating (against the schema shipped in the package), writing atomically, the split
names and path rebasing belong to the manifest's one owner, :mod:`m2diff_monai.data.manifest`, re-exported here
for the pipeline and ``merge``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m2diff_monai.data import manifest as owner
from m2diff_monai.data.manifest import (  # noqa: F401 (re-exported for the pipeline and merge)
    LIST_KEYS,
    now_iso,
    read_manifest,
    rebase,
    relative_path,
    write_manifest,
)

TOOL = "m2diff-preprocess"


def provenance(parameters: dict, notes: str = "", shard: tuple[int, int] | None = None, **extra: Any) -> dict:
    return owner.provenance(TOOL, parameters, notes=notes, shard=shard, **extra)


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
        lists[owner.datalist_key(split)].extend(slices)
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
