"""The source bundles a wheel ships, and how ``--bundle`` finds one.

The repository's ``bundles/`` folder is the only hand-edited copy of the bundle configs. Building a wheel
(``setup.py``'s build step) copies every ``bundles/<name>/`` folder into the wheel as ``m2diff_monai/bundles/<name>/``
so that ``m2diff-infer --bundle m2diff`` and ``m2diff-export --bundle m2diff`` work without a checkout. A checkout
(or an editable install) has no such copy: there ``--bundle`` takes the folder, ``bundles/m2diff``.

``python -m m2diff_monai.shipped [NAME]`` prints the shipped bundles folder (or one bundle's folder), e.g. for
``python -m monai.bundle run --config_file "$(python -m m2diff_monai.shipped m2diff)/train.json"``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from m2diff_monai.errors import InputError

SHIPPED_DIR = "bundles"  # inside the m2diff_monai package of an installed wheel
SCHEMA_BUNDLE = "schema"  # bundles/schema/meta_schema.json: MONAI's metadata schema, for offline validation


def shipped_bundles_dir() -> Path | None:
    """``m2diff_monai/bundles`` of an installed wheel; None in a checkout or an editable install (no copy there)."""
    folder = resources.files("m2diff_monai") / SHIPPED_DIR
    return folder if isinstance(folder, Path) and folder.is_dir() else None


def shipped_bundle_names() -> list[str]:
    """Names ``--bundle`` accepts besides a folder (``m2diff``, ``mfdiff``); empty where nothing is shipped."""
    root = shipped_bundles_dir()
    if root is None:
        return []
    return sorted(p.name for p in root.iterdir() if (p / "inference.json").is_file())


def resolve_bundle(bundle: str | Path) -> Path:
    """A ``--bundle`` value → the bundle folder: an existing path as given (a folder, or a file such as
    ``inference.json``), else a bare name of a bundle the wheel ships. InputError naming both otherwise."""
    path = Path(bundle)
    if path.exists():
        return path
    names = shipped_bundle_names()
    if str(bundle) in names:
        return shipped_bundles_dir() / str(bundle)  # type: ignore[operator]  # names non-empty ⇒ folder exists
    shipped = (
        f"shipped bundle names: {', '.join(names)}"
        if names
        else "this install ships no bundles (a checkout or an editable install: give the folder, e.g. bundles/m2diff)"
    )
    raise InputError(f"no bundle folder or shipped bundle of this name ({shipped})", path=path)


def meta_schema_path() -> Path | None:
    """The shipped copy of MONAI's bundle metadata schema, when this is an installed wheel."""
    root = shipped_bundles_dir()
    path = None if root is None else root / SCHEMA_BUNDLE / "meta_schema.json"
    return path if path is not None and path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    """Print the shipped bundles folder, or one named bundle's folder; exit 2 when there is none."""
    args = list(sys.argv[1:] if argv is None else argv)
    root = shipped_bundles_dir()
    if root is None:
        print(
            "m2diff_monai.shipped: this install ships no bundles (use the checkout's bundles/ folder)", file=sys.stderr
        )
        return 2
    if not args:
        print(root)
        return 0
    if args[0] not in shipped_bundle_names():
        print(
            f"m2diff_monai.shipped: no shipped bundle {args[0]!r} (have: {', '.join(shipped_bundle_names())})",
            file=sys.stderr,
        )
        return 2
    print(root / args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
