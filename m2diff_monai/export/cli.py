"""``m2diff-export``: a training checkpoint → a standard, deployable MONAI bundle folder.

    m2diff-export --bundle bundles/m2diff --checkpoint runs/m2diff/checkpoints/best.pt --out exported/m2diff
    m2diff-export --bundle bundles/mfdiff --checkpoint runs/mfdiff-demo/external/checkpoints/best.pt \
        --out exported/mfdiff --set start_step=200 --set steps=10

Exit codes: 0 success, 2 bad input or options (one line on stderr naming the file; nothing written), 1 an
unexpected internal error (one line naming the log with the traceback, ``--debug`` prints it; nothing written
either: the folder is built under a temporary name), 130 interrupted (m2diff_monai.cli_runner).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2diff_monai.cli_runner import run_cli
from m2diff_monai.errors import InputError
from m2diff_monai.runtime import configure_threads

PROG = "m2diff-export"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export a trained M2Diff/MFdiff checkpoint as a standard MONAI bundle: configs/ (metadata, "
        "inference, training), models/model.pt, models/model.ts (TorchScript denoiser), optional "
        "models/model.onnx, docs/README.md (model card) and LICENSE. See docs/export.md.",
    )
    p.add_argument(
        "--bundle",
        required=True,
        type=Path,
        help="source bundle folder with inference.json and metadata.json (e.g. bundles/m2diff), or "
        "the name of a bundle an installed wheel ships (m2diff, mfdiff)",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="training checkpoint (.pt) with its config")
    p.add_argument("--out", required=True, type=Path, help="folder to write the exported bundle to")
    p.add_argument(
        "--weights",
        choices=("ema", "raw", "network"),
        default=None,
        metavar="{ema,raw}",
        help="weights to export (default: the EMA weights when the checkpoint has them, else raw; "
        "'network' is accepted for 'raw')",
    )
    p.add_argument("--name", default=None, help="model name in metadata.json (default: the source bundle's)")
    p.add_argument(
        "--version",
        default=None,
        help="bundle version X.Y.Z recorded with a changelog entry (default: the source bundle's)",
    )
    p.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="evaluation summary (.csv or .json, e.g. from m2diff-evaluate) for the model card and "
        "metadata eval_metrics",
    )
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference setting to write into configs/inference.json, e.g. --set steps=20; it wins over "
        "the sampler the checkpoint stores (its training run's inference_defaults), which is "
        "exported without this option (repeatable; keys as in m2diff-infer's settings; VALUE is "
        "JSON or text)",
    )
    p.add_argument("--onnx", action="store_true", help="also write models/model.onnx (needs the onnx package)")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it exists and is not empty (an earlier export); never allowed when --out "
        "is or holds an input (the checkpoint, the source bundle, --metrics): see docs/safety.md",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``["start_step=200", "sampler=ddim"]`` → ``{"start_step": 200, "sampler": "ddim"}`` (JSON values where
    they parse, text otherwise; ``null`` is None)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), _export, argv, interrupted="nothing written")


def _export(args: argparse.Namespace) -> int:
    configure_threads()
    from m2diff_monai.export.bundle import export_bundle

    result = export_bundle(
        args.bundle,
        args.checkpoint,
        args.out,
        weights=args.weights,
        name=args.name,
        version=args.version,
        onnx=args.onnx,
        metrics=args.metrics,
        force=args.force,
        check=True,
        progress=not args.no_progress,
        sampler_defaults=parse_settings(args.settings),
    )
    for note in result.warnings:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    print(
        f"exported {result.weights} weights as bundle version {result.version} to {result.out} "
        f"({len(result.files)} files)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
