"""``m2diff-preprocess``: dispatch to one subcommand module, imported only when chosen.

Each subcommand lives in a module exposing ``configure(parser)`` and ``main(args) -> int``. Importing lazily keeps
``--help`` and ``validate`` fast (no torch/ANTs import) and lets the top-level help work even when a subcommand's
module is missing from an installation.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from m2diff_monai.cli_runner import add_debug_option, print_error, run_cli
from m2diff_monai.runtime import configure_threads

PROG = "m2diff-preprocess"

# name -> (module, one-line description shown by the top-level --help)
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("preprocessing.validate", "check a subjects table and every file it lists; writes nothing"),
    "run": (
        "preprocessing.pipeline",
        "preprocess subjects: register, mask, normalize, crop, slice, split, write a manifest",
    ),
    "merge": ("preprocessing.merge", "join the manifests of shards run with --shard I/N"),
    "simulate": ("preprocessing.simulate", "make low-dose PET from standard-dose PET at a dose reduction factor"),
    "demo": ("preprocessing.demo", "build the embedded demo cohort, preprocessed, with data_manifests/demo.json"),
}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("m2diff-monai")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Preprocessing for MRI-guided low-dose PET enhancement (M2Diff, MFdiff).",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    add_debug_option(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, description) in COMMANDS.items():
        sub.add_parser(name, help=description, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = argv[:1] == ["--debug"]  # `m2diff-preprocess --debug run ...` means `run ... --debug`
    if debug:
        argv = argv[1:]
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        parser.parse_args(argv)  # handles --help, --version and unknown commands (exits)
        parser.error("choose a command")  # only reached without any argument
    name, rest = argv[0], argv[1:] + (["--debug"] if debug else [])
    module_name, description = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print_error(PROG, f"command '{name}' is not available in this installation (no module {module_name})")
        return 1
    parser = argparse.ArgumentParser(prog=f"{PROG} {name}", description=description)
    module.configure(parser)
    return run_cli(parser, lambda args: _run_command(module, args), rest, prog=PROG)


def _run_command(module, args: argparse.Namespace) -> int:
    configure_threads(import_torch=False)
    return int(module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
