"""Set-up for ``python -m monai.bundle run ...`` (and ``torchrun -m monai.bundle``): thread count and readable errors.

MONAI wraps every failure while instantiating a config component in ``RuntimeError("Failed to instantiate
component ...")`` and Python prints the whole 50–70-line chain; the line that helps (our ``InputError``: a missing
manifest, a missing checkpoint, a bad ``--steps``) sits in the middle. :func:`install` replaces ``sys.excepthook``
so a bundle run ends in ONE line naming the problem (and, in our messages, the fix), exit status 1.
``M2DIFF_DEBUG=1`` keeps Python's full traceback. The formatting helpers are the command line tools' own
(:mod:`m2diff_monai.cli_runner`), so a bundle run and ``m2diff-infer`` report an error alike.

``m2diff_monai/__init__.py`` calls :func:`install` when the program being run is ``monai.bundle`` — the bundle
configs' ``$import m2diff_monai...`` lines are the first code of ours such a run executes. Library users and our
CLIs (which print their own one-line errors) are unaffected.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from m2diff_monai.cli_runner import DEBUG_VARIABLE, debug_requested, exception_chain, one_line

DEBUG_HINT = f"{DEBUG_VARIABLE}=1 shows the full traceback"
# Exception types whose message is written for users (by us or by the checks we call): shown as they are.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError)
MONAI_WRAPPER_PREFIX = "Failed to instantiate component"

_installed = False


def running_monai_bundle() -> bool:
    """True when the program is ``python -m monai.bundle`` (directly or under torchrun)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and getattr(spec, "name", "") in ("monai.bundle.__main__", "monai.bundle"):
        return True
    argv0 = sys.argv[0].replace("\\", "/") if sys.argv else ""
    return argv0.endswith("monai/bundle/__main__.py")


def summary_line(error: BaseException) -> str:
    """The single line a failed bundle run ends with: our ``InputError`` anywhere in the chain, else a user-facing
    error type (``ValueError``, ``FileNotFoundError``...), else the innermost exception labelled internal."""
    from m2diff_monai.errors import InputError

    chain = exception_chain(error)
    for candidate in chain:
        if isinstance(candidate, InputError):
            return f"error: {candidate.line()} ({DEBUG_HINT})"
    for candidate in chain:
        if isinstance(candidate, USER_ERRORS) and not str(candidate).startswith(MONAI_WRAPPER_PREFIX):
            return f"error: {one_line(candidate)} ({DEBUG_HINT})"
    innermost = chain[-1]
    return f"internal error: {type(innermost).__name__}: {one_line(innermost)} ({DEBUG_HINT})"


def _hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
    if debug_requested() or not isinstance(error, Exception):
        sys.__excepthook__(kind, error, traceback)  # KeyboardInterrupt and --debug: Python's own report
        return
    try:
        line = summary_line(error)
    except Exception:  # never hide the original failure behind a failure of this hook
        sys.__excepthook__(kind, error, traceback)
        return
    print(line, file=sys.stderr, flush=True)


def install() -> None:
    """Configure threads and the one-line error hook, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.excepthook = _hook
    from m2diff_monai.runtime import configure_threads

    configure_threads()


def report_outputs(summary: dict[str, Any], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Print where a bundle inference wrote its results (MONAI prints nothing after a successful run), as
    ``m2diff-infer`` does; returns ``summary`` unchanged."""
    if "subjects" in summary:
        for entry in summary["subjects"]:
            print(f"{entry['subject']}: {entry['files']['prediction']}", flush=True)
        listing = f"; list: {Path(out_dir) / 'predictions.json'}" if out_dir is not None else ""
        print(f"{len(summary['subjects'])} subject(s) written{listing}", flush=True)
        return summary
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    files = dict(summary.get("files") or {})
    prediction = files.pop("prediction", None)
    others = f" (also: {', '.join(str(v) for v in files.values())})" if files else ""
    print(f"wrote {prediction}{others}", flush=True)
    return summary
