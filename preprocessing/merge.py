"""``m2diff-preprocess merge``: join shard manifests (``run --shard I/N``) into one manifest.

Rejected (one line naming the file, exit 2): a manifest that breaks the schema, parameters that differ between
manifests (different preprocessing must not be mixed), a subject present in two manifests, the same shard twice
or shards of different N. Missing shards are only warned about (a partial merge can be useful). Paths are
rewritten relative to the merged manifest's folder; items are sorted like a single run's, so merging all shards
gives the same lists as an unsharded run.

The shards' QC tables (``qc/summary_shard-I-of-N.csv``, failed subjects included) are joined into one: the
preprocessed folder's ``qc/summary.csv``/``.md`` when all shards wrote to one folder (what an unsharded run writes),
else ``<merged manifest stem>_qc_summary.csv``/``.md`` beside the merged manifest.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from m2diff_monai.errors import InputError

from . import manifest as manifest_stage
from . import qc as qc_stage
from .outputs import guard_merge


def _warn(message: str) -> None:
    print(f"m2diff-preprocess merge: warning: {message}", file=sys.stderr)


def _qc_summary_path(path: Path, manifest: dict) -> Path | None:
    """The QC table the run that wrote ``manifest`` left in its preprocessed folder (None: no subject to find it)."""
    if not manifest["volumes"]:
        return None
    first = (path.resolve().parent / manifest["volumes"][0]["ld_pet"]).resolve()  # <out>/subjects/<sid>/ld_pet...
    shard = manifest["provenance"].get("shard")
    name = f"summary_shard-{shard[0]}-of-{shard[1]}.csv" if shard else "summary.csv"
    return first.parents[2] / "qc" / name


def _qc_target(sources: list[tuple[Path, Path | None]], out: Path) -> Path:
    folders = {summary.parent for _, summary in sources if summary is not None}
    if len(folders) == 1:
        return folders.pop() / "summary.csv"
    return out.resolve().parent / f"{out.stem}_qc_summary.csv"


def merge_qc_summaries(loaded: list[tuple[Path, dict]], out: Path) -> Path | None:
    """Join the shards' QC tables into one (see the module docstring); returns the CSV written, or None."""
    sources = [(path, _qc_summary_path(path, manifest)) for path, manifest in loaded]
    rows: list[dict] = []
    for path, summary in sources:
        if summary is None or not summary.is_file():
            _warn(f"no QC summary found for {path} ({summary or 'no subjects'}); the merged summary lacks its rows")
            continue
        with open(summary, newline="") as fh:
            rows.extend(csv.DictReader(fh))
    if not rows:
        return None
    target = _qc_target(sources, out)
    rows.sort(key=lambda row: row.get("subject", ""))
    qc_stage.write_summary(target, target.with_suffix(".md"), rows)
    return target


def _check_mergeable(loaded: list[tuple[Path, dict]]) -> None:
    """Refuse manifests made with other parameters, a shard given twice or from another N, and a subject in two
    manifests; warn when shards are missing."""
    first_path, first = loaded[0]
    params = first["provenance"]["parameters"]
    owner: dict[str, Path] = {}
    shards: dict[int, Path] = {}
    shard_n = None
    for path, manifest in loaded:
        other = manifest["provenance"]["parameters"]
        if other != params:
            keys = sorted(k for k in set(params) | set(other) if params.get(k) != other.get(k))
            differences = ", ".join(f"{k}: {params.get(k)!r} vs {other.get(k)!r}" for k in keys)
            raise InputError(f"parameters differ from {first_path} ({differences})", path=path)
        shard = manifest["provenance"].get("shard")
        if shard:
            i, n = shard
            if shard_n is not None and n != shard_n:
                raise InputError(f"shard {i}/{n} does not match the other manifests' N = {shard_n}", path=path)
            shard_n = n
            if i in shards:
                raise InputError(f"shard {i}/{n} already given by {shards[i]}", path=path)
            shards[i] = path
        for volume in manifest["volumes"]:
            sid = volume["subject"]
            if sid in owner:
                raise InputError(f"subject {sid} is also in {owner[sid]} (duplicate subject)", subject=sid, path=path)
            owner[sid] = path
    if shard_n is not None:
        missing = sorted(set(range(1, shard_n + 1)) - set(shards))
        if missing:
            _warn(
                f"shard(s) {', '.join(f'{i}/{shard_n}' for i in missing)} not given; the merged manifest lacks "
                "their subjects"
            )


def merge_manifests(paths: list[Path], out: Path, notes: str | None = None) -> dict:
    """Merge ``paths`` into ``out`` (written atomically, validated); return the merged manifest."""
    if not paths:
        raise InputError("no manifests to merge")
    out = Path(out)
    loaded = []
    for path in paths:
        path = Path(path)
        loaded.append((path, manifest_stage.read_manifest(path)))  # InputError naming the file when invalid

    qc_sources = [(path, _qc_summary_path(path, manifest)) for path, manifest in loaded]
    qc_target = _qc_target(qc_sources, out)
    guard_merge(
        [p for p, _ in loaded],
        out,
        [qc_target, qc_target.with_suffix(".md")],
        [s for _, s in qc_sources if s is not None and s.is_file()],
    )
    _check_mergeable(loaded)
    first = loaded[0][1]
    params = first["provenance"]["parameters"]

    out_dir = out.resolve().parent
    lists: dict[str, list[dict]] = {k: [] for k in manifest_stage.LIST_KEYS}
    for path, manifest in loaded:
        rebased = manifest_stage.rebase(manifest, path.resolve().parent, out_dir)
        for key in manifest_stage.LIST_KEYS:
            lists[key].extend(rebased[key])
    orientations = list(params.get("orientations", []))
    for key in manifest_stage.LIST_KEYS:
        lists[key].sort(key=lambda it: manifest_stage.sort_key(it, orientations))
    all_notes = [m["provenance"].get("notes", "") for _, m in loaded]
    prov = manifest_stage.provenance(
        params,
        notes=notes if notes is not None else "\n".join(dict.fromkeys(n for n in all_notes if n)),
        shard=None,
        merged_from=[manifest_stage.relative_path(p, out_dir) for p, _ in loaded],
    )
    merged = {
        "name": out.stem,
        "description": (
            f"m2diff-monai preprocessed data ({len(lists['volumes'])} subjects, merged from {len(loaded)} manifests)"
        ),
        "space": first.get("space", params.get("space", "pet")),
        "size": first.get("size", params.get("size", 256)),
        "orientations": orientations,
        **lists,
        "provenance": prov,
    }
    manifest_stage.write_manifest(out, merged)
    merge_qc_summaries(loaded, out)
    return merged


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--manifests", required=True, nargs="+", type=Path, help="shard manifests to join")
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="merged manifest, e.g. data_manifests/NAME.json (never one of --manifests: docs/safety.md)",
    )
    parser.add_argument("--notes", default=None, help="provenance notes (default: the shards' notes)")
    return parser


def main(args: argparse.Namespace) -> int:
    try:
        merged = merge_manifests(list(args.manifests), args.out, notes=args.notes)
    except InputError as err:
        print(err.line(), file=sys.stderr)
        return 2
    print(f"merged {len(args.manifests)} manifests: {len(merged['volumes'])} subjects → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(configure(argparse.ArgumentParser(prog="m2diff-preprocess merge")).parse_args()))
