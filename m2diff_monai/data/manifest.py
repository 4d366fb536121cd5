"""The one owner of the data manifest (SPEC "Manifest"): its schema, reading, validating, writing, the split names
and selecting items by split and subject. Every caller — preprocessing, training, inference, evaluation,
export, benchmarks — goes through here, so a change to the format is made once.

The manifest is a MONAI datalist: lists ``training``/``validation``/``test`` hold 2D slice items, ``volumes`` one
item per subject; every path is relative to the manifest's folder. Two vocabularies are part of the contract and
both live here: the *split* of a subject (``train``/``val``/``test``, the subjects table's ``split`` column and a
volume item's ``split``) and the *datalist key* holding that split's slice items (``training``/``validation``/
``test``, what ``monai.data.load_decathlon_datalist(..., data_list_key=K)`` takes). Either spelling is accepted
wherever a split is asked for.

The schema ships inside the package (``manifest_schema.json``, package data) so an installed wheel validates too;
``data_manifests/schema.json`` is the same file for readers of the repository (a test keeps them identical).

Note for readers: ``monai.data.load_decathlon_datalist`` turns every string value that names an existing path
into an absolute one — including ``""`` (→ the manifest's folder) — so :func:`slice_items` resolves paths itself
and tests ``mri_available`` rather than ``mri``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from m2diff_monai.data.orientation import parse_orientations
from m2diff_monai.errors import InputError
from m2diff_monai.io import safety
from m2diff_monai.io.atomic import save_json

SCHEMA_PATH = Path(__file__).with_name("manifest_schema.json")

SPLITS: tuple[str, ...] = ("train", "val", "test")
ALL = "all"  # every volume, whatever its split (inference and evaluation)
DATALIST_KEYS: dict[str, str] = {"train": "training", "val": "validation", "test": "test"}
SPLIT_ALIASES: dict[str, str] = {**{s: s for s in SPLITS}, **{key: s for s, key in DATALIST_KEYS.items()}}
SLICE_LISTS: tuple[str, ...] = tuple(DATALIST_KEYS.values())
LIST_KEYS: tuple[str, ...] = (*SLICE_LISTS, "volumes")
MANIFEST_HINT = (
    "create it with: m2diff-preprocess demo --out work/demo --downsample 2 --size 64 "
    "--manifest data_manifests/demo.json (the demo cohort bundles/*/demo.json is tuned for; "
    "or m2diff-preprocess run ... --manifest PATH)"
)


# ----------------------------------------------------------------------------------------------- split names
def canonical_split(name: str, allow_all: bool = False, path: str | Path | None = None) -> str | None:
    """``train``/``val``/``test`` for either spelling (``training``/``validation`` too); ``all`` → None when
    ``allow_all``. Anything else is an ``InputError`` listing the choices."""
    key = str(name).strip().lower()
    if allow_all and key == ALL:
        return None
    if key not in SPLIT_ALIASES:
        choices = ", ".join((*SPLITS, ALL) if allow_all else SPLITS)
        raise InputError(f"unknown split {name!r}; choose from {choices} (or training, validation)", path=path)
    return SPLIT_ALIASES[key]


def datalist_key(split: str) -> str:
    """The list holding ``split``'s slice items (``training``/``validation``/``test``), for either spelling."""
    return DATALIST_KEYS[canonical_split(split)]  # type: ignore[index]


# ----------------------------------------------------------------------------------------- schema, read, write
@lru_cache(maxsize=1)
def load_schema() -> dict:
    """The manifest JSON Schema shipped with the package."""
    return json.loads(SCHEMA_PATH.read_text())


def schema_problems(manifest: Any) -> list[str]:
    """Every schema violation of ``manifest`` as ``"<where>: <message>"`` (empty when it is valid)."""
    validator = jsonschema.Draft202012Validator(load_schema(), format_checker=jsonschema.FormatChecker())
    problems = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path))):
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path).lstrip(".")
        problems.append(f"{where or 'top level'}: {' '.join(err.message.split())}")
    return problems


def validate_manifest(manifest: Any, path: str | Path | None = None) -> None:
    """``InputError`` (one line, naming ``path``) for the first schema violation, with a count of the others."""
    problems = schema_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"manifest breaks the manifest schema at {problems[0]}{more}", path=path)


def read_manifest(path: str | Path, require: str | None = None) -> dict[str, Any]:
    """The manifest at ``path``, validated against the schema. A missing file, bad JSON or a schema violation is an
    ``InputError`` naming the file (a missing one also names the command that makes one); ``require`` names a
    list (``volumes`` or a split in either spelling) that must not be empty."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest not found; {MANIFEST_HINT}", path=path)
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"manifest is not valid JSON ({' '.join(str(err).split())})", path=path) from None
    validate_manifest(content, path)
    if require is not None:
        key = require if require == "volumes" else datalist_key(require)
        if not content[key]:
            raise InputError(f"manifest has an empty {key!r} list", path=path)
    return content


def write_manifest(path: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Validate, then write atomically (a reader never sees half a manifest; an invalid one is never written)."""
    validate_manifest(manifest, path)
    return save_json(path, dict(manifest))


def manifest_provenance(path: str | Path | None) -> dict[str, Any] | None:
    """The raw manifest of ``path`` for *informational* readers (a checkpoint's recorded training manifest, a model
    card): no schema check and None — never an error — when the file is gone or unreadable, because the
    manifest a model was trained on is often not on the machine that uses the model."""
    if not path:
        return None
    try:
        content = json.loads(Path(str(path)).read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def provenance_parameters(path: str | Path | None) -> dict[str, Any]:
    """``provenance.parameters`` of the manifest at ``path`` (a deep copy), ``{}`` when unknown."""
    content = manifest_provenance(path) or {}
    provenance = content.get("provenance")
    parameters = provenance.get("parameters") if isinstance(provenance, dict) else None
    return json.loads(json.dumps(parameters)) if isinstance(parameters, dict) else {}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(
    tool: str, parameters: Mapping[str, Any], notes: str = "", shard: tuple[int, int] | None = None, **extra: Any
) -> dict[str, Any]:
    """The ``provenance`` object the schema requires: tool, package version, creation time, parameters, notes."""
    import m2diff_monai

    return {
        "tool": tool,
        "version": m2diff_monai.__version__,
        "created": now_iso(),
        "parameters": dict(parameters),
        "notes": notes,
        "shard": list(shard) if shard else None,
        **extra,
    }


def _path_keys(item_def: str) -> tuple[str, ...]:
    """The keys of a slice or volume item that hold one path, read from the schema (its single definition)."""
    properties = load_schema()["$defs"][item_def]["properties"]
    refs = ("#/$defs/relpath", "#/$defs/optional_relpath")
    return tuple(key for key, spec in properties.items() if spec.get("$ref") in refs)


SLICE_PATH_KEYS: tuple[str, ...] = _path_keys("slice_item")  # ld_pet, sd_pet, mri
VOLUME_PATH_KEYS: tuple[str, ...] = _path_keys("volume_item")  # + brain_mask, source_*, preprocessed_dir, ...


# ----------------------------------------------------------------------------------------------- paths
def relative_path(path: str | Path | None, base: str | Path) -> str:
    """``path`` relative to ``base`` in POSIX form (how the manifest stores paths); ``""`` for no path."""
    if path in (None, ""):
        return ""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()


def item_path(base: str | Path, value: Any) -> Path | None:
    """A manifest item's relative path resolved against the manifest's folder ``base``; None when the key is empty."""
    return Path(base) / str(value) if value not in (None, "") else None


def subject_record_path(item: Mapping[str, Any], base: str | Path) -> Path:
    """Where a volume item's ``subject.json`` lies: its ``subject_json`` key, else ``subject.json`` in its
    ``preprocessed_dir`` (the manifest's folder when that is not given either)."""
    folder = item_path(base, item.get("preprocessed_dir")) or Path(base)
    return item_path(base, item.get("subject_json")) or folder / "subject.json"


def read_subject_record(item: Mapping[str, Any], base: str | Path, subject: str, required: bool) -> dict[str, Any]:
    """The preprocessed subject's record (``subject.json``, see :func:`subject_record_path`). A missing record is
    an ``InputError`` when ``required`` (inference needs its crop box) and ``{}`` otherwise (evaluation falls back
    to the manifest item); an unreadable one is always an ``InputError`` naming the subject and the file."""
    path = subject_record_path(item, base)
    if not required and not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(
            "subject.json of the preprocessed subject does not exist", subject=subject, path=path
        ) from None
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read subject.json ({err})", subject=subject, path=path) from None


def rebase(manifest: Mapping[str, Any], from_dir: str | Path, to_dir: str | Path) -> dict[str, Any]:
    """Rewrite every relative path of ``manifest`` (written in ``from_dir``) to be relative to ``to_dir``."""
    from_dir, to_dir = Path(from_dir).resolve(), Path(to_dir).resolve()
    if from_dir == to_dir:
        return dict(manifest)

    def move(p: str) -> str:
        return relative_path(from_dir / p, to_dir) if p else ""

    out = dict(manifest)
    for key in SLICE_LISTS:
        out[key] = [{**it, **{k: move(it[k]) for k in SLICE_PATH_KEYS if k in it}} for it in manifest[key]]
    out["volumes"] = [
        {
            **it,
            **{k: move(it[k]) for k in VOLUME_PATH_KEYS if k in it},
            "regions": {n: move(p) for n, p in it.get("regions", {}).items()},
        }
        for it in manifest["volumes"]
    ]
    return out


# ----------------------------------------------------------------------------------------------- selecting
def select_volumes(
    content: Mapping[str, Any],
    split: str,
    subjects: Sequence[str] | None = None,
    path: str | Path | None = None,
    purpose: str = "",
) -> list[dict[str, Any]]:
    """The ``volumes`` items of ``split`` (either spelling, or ``all``), restricted to ``subjects`` when given.
    Subject ids become file names, so each is checked to be a safe name; an unknown subject or an empty
    selection is an ``InputError`` naming the manifest (``purpose``, e.g. "evaluate", completes that message)."""
    wanted = canonical_split(split, allow_all=True, path=path)
    items = [
        dict(it)
        for it in content.get("volumes") or []
        if isinstance(it, Mapping) and (wanted is None or it.get("split") == wanted)
    ]
    for item in items:
        safety.check_name(item.get("subject"), "manifest subject id", path)
    if subjects:
        chosen = {str(s) for s in subjects}
        missing = sorted(chosen - {str(it.get("subject")) for it in items})
        if missing:
            raise InputError(f"subject(s) {', '.join(missing)} not in the manifest's {split} volumes", path=path)
        items = [it for it in items if str(it.get("subject")) in chosen]
    if not items:
        raise InputError(f"manifest has no '{split}' volumes" + (f" to {purpose}" if purpose else ""), path=path)
    return items


def slice_items(
    path: str | Path, split: str = "training", orientations: str | Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The slice items of ``split`` (either spelling) of the manifest at ``path`` with absolute paths (``""`` for
    an absent file), only ``orientations`` when given; ``mri_available`` is 1 only when an MRI path is listed.
    An empty selection is an ``InputError`` naming the manifest."""
    path = Path(path)
    key = datalist_key(split)
    content = read_manifest(path)
    wanted = None if orientations is None else set(parse_orientations(orientations))
    base = path.resolve().parent
    items = []
    for item in content[key]:
        if wanted is not None and item.get("orientation") not in wanted:
            continue
        resolved = dict(item)
        for name in SLICE_PATH_KEYS:
            resolved[name] = str(item_path(base, item.get(name)) or "")
        resolved["mri_available"] = int(bool(item.get("mri_available", 0)) and bool(resolved["mri"]))
        items.append(resolved)
    if not items:
        which = "" if wanted is None else f" for orientations {sorted(wanted)}"
        raise InputError(f"manifest has no '{key}' slice items{which}; {MANIFEST_HINT}", path=path)
    return items


__all__ = [
    "ALL",
    "DATALIST_KEYS",
    "LIST_KEYS",
    "MANIFEST_HINT",
    "SCHEMA_PATH",
    "SLICE_LISTS",
    "SLICE_PATH_KEYS",
    "SPLITS",
    "SPLIT_ALIASES",
    "VOLUME_PATH_KEYS",
    "canonical_split",
    "datalist_key",
    "item_path",
    "load_schema",
    "manifest_provenance",
    "now_iso",
    "provenance",
    "provenance_parameters",
    "read_manifest",
    "read_subject_record",
    "rebase",
    "relative_path",
    "schema_problems",
    "select_volumes",
    "slice_items",
    "subject_record_path",
    "validate_manifest",
    "write_manifest",
]
