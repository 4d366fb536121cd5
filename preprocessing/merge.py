"""``m2diff-preprocess merge``: join shard manifests (``run --shard I/N``) into one manifest.

Rejected (one line naming the file, exit 2): a manifest that breaks the schema, parameters that differ between
manifests (different preprocessing must not be mixed), a subject present in two manifests, the same shard twice
or shards of different N. Missing shards are only warned about (a partial merge can be useful). Paths are
rewritten relative to the merged manifest's folder; items are sorted like a single run's, so merging all shards
gives the same lists as an unsharded run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from m2diff_monai.errors import InputError

from . import manifest as manifest_stage


def merge_manifests(paths: list[Path], out: Path, notes: str | None = None) -> dict:
    """Merge ``paths`` into ``out`` (written atomically, validated); return the merged manifest."""
    if not paths:
        raise InputError("no manifests to merge")
    out = Path(out)
    loaded = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise InputError("manifest does not exist", path=path)
        try:
            manifest = manifest_stage.read_manifest(path)
        except ValueError as err:  # json.JSONDecodeError is a ValueError
            raise InputError(f"not a JSON manifest ({err})", path=path) from None
        except Exception as err:  # jsonschema.ValidationError
            message = getattr(err, "message", str(err))
            raise InputError(f"manifest breaks data_manifests/schema.json: {message}", path=path) from None
        loaded.append((path, manifest))

    first_path, first = loaded[0]
    params = first["provenance"]["parameters"]
    owner: dict[str, Path] = {}
    shards: dict[int, Path] = {}
    shard_n = None
    for path, manifest in loaded:
        other = manifest["provenance"]["parameters"]
        if other != params:
            keys = sorted(k for k in set(params) | set(other) if params.get(k) != other.get(k))
            raise InputError(
                f"parameters differ from {first_path} ({', '.join(f'{k}: {params.get(k)!r} vs {other.get(k)!r}' for k in keys)})",
                path=path,
            )
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
            print(f"m2diff-preprocess merge: warning: shard(s) {', '.join(f'{i}/{shard_n}' for i in missing)} "
                  "not given; the merged manifest lacks their subjects", file=sys.stderr)

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
        "description": f"m2diff-monai preprocessed data ({len(lists['volumes'])} subjects, merged from {len(loaded)} manifests)",
        "space": first.get("space", params.get("space", "pet")),
        "size": first.get("size", params.get("size", 256)),
        "orientations": orientations,
        **lists,
        "provenance": prov,
    }
    manifest_stage.write_manifest(out, merged)
    return merged


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--manifests", required=True, nargs="+", type=Path, help="shard manifests to join")
    parser.add_argument("--out", required=True, type=Path, help="merged manifest, e.g. data_manifests/NAME.json")
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
