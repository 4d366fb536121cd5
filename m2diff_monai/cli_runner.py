"""The one way every command line tool ends: ``m2diff-preprocess``, ``m2diff-infer``, ``m2diff-evaluate``,
``m2diff-export`` all run their work through :func:`run_cli`, so their failures read the same:

- bad options: argparse's usage and ``PROG: error: ...``, exit 2;
- bad input (:class:`~m2diff_monai.errors.InputError`): ``PROG: error: <its one line>``, exit 2;
- anything else (a bug, a full disk, a library failure): ``PROG: internal error: Type: message`` and the path of a
  log file holding the full traceback and the command line, exit 1 — one line, because a traceback in the middle
  of a cohort run's output hides the progress report the user needs, and the log keeps what a bug report needs;
- Ctrl-C: ``PROG: interrupted ...``, exit 130;
- a :class:`~m2diff_monai.errors.UserFacingWarning` (e.g. a sampler start above the steps a checkpoint was
  trained on): ``PROG: warning: <one line>``, not Python's ``file:line: UserWarning`` plus a source line; other
  warnings keep Python's format.

``--debug`` (added to every command by :func:`run_cli`) or ``M2DIFF_DEBUG=1`` also prints the full traceback on
stderr. The error log goes to ``$M2DIFF_LOG_DIR`` when set, else the system's temporary folder: never into an
output folder, which a failed run must leave untouched (and which, before the input checks ran, could even be an
input folder).

The formatting helpers (:func:`exception_chain`, :func:`one_line`, :func:`input_error_in`) are shared with
:mod:`m2diff_monai.bundle_run`, which gives ``python -m monai.bundle run`` the same one-line errors. This module
imports only the standard library at import time: ``m2diff_monai/__init__.py`` reaches it for every bundle run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

DEBUG_VARIABLE = "M2DIFF_DEBUG"
LOG_DIR_VARIABLE = "M2DIFF_LOG_DIR"
DEBUG_HINT = f"--debug or {DEBUG_VARIABLE}=1 prints it here"
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


# ------------------------------------------------------------------------------------------ formatting
def debug_requested(flag: bool = False) -> bool:
    """``--debug`` given, or ``M2DIFF_DEBUG`` set to anything but empty/``0``."""
    return bool(flag) or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        chain.append(current)
        seen.add(id(current))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


def describe(error: BaseException) -> str:
    """``Type: message`` on one line."""
    message = one_line(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def input_error_in(error: BaseException):
    """Our :class:`~m2diff_monai.errors.InputError` anywhere in ``error``'s chain (a library may wrap it), or None."""
    from m2diff_monai.errors import InputError

    return next((e for e in exception_chain(error) if isinstance(e, InputError)), None)


def print_error(prog: str, message: str) -> None:
    """``PROG: error: message`` on stderr: the line every bad-input report uses."""
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------- log
def _log_folder() -> Path:
    return Path(os.environ.get(LOG_DIR_VARIABLE) or tempfile.gettempdir())


def _package_version() -> str:
    """The installed distribution's version (read from its metadata, not by importing the package: the package's
    ``__init__`` imports this module through ``bundle_run``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("m2diff-monai")
    except PackageNotFoundError:
        return "unknown"


def write_error_log(prog: str, error: BaseException) -> Path | None:
    """Write the full traceback, the command line and the versions to a new log file; its path, or None when it
    cannot be written (the one-line report then says so)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name = re.sub(r"[^A-Za-z0-9_-]", "-", prog)
    try:
        folder = _log_folder()
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{name}-{stamp}-", suffix=".log", dir=folder)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{prog} failed at {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
            fh.write(f"command: {' '.join(sys.argv)}\n")
            fh.write(f"working folder: {os.getcwd()}\n")
            fh.write(
                f"m2diff-monai {_package_version()}, Python {platform.python_version()}, {platform.platform()}\n\n"
            )
            fh.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    except OSError:
        return None
    return Path(path)


# ----------------------------------------------------------------------------------------------- runner
def add_debug_option(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on ``parser`` (once)."""
    if "--debug" not in parser._option_string_actions:
        parser.add_argument(
            "--debug",
            action="store_true",
            help=f"on an error, also print the full traceback (same as {DEBUG_VARIABLE}=1)",
        )


@contextmanager
def one_line_warnings(prog: str, debug: bool = False) -> Iterator[None]:
    """Inside: :class:`~m2diff_monai.errors.UserFacingWarning` prints as ``PROG: warning: message`` (with ``debug``,
    Python's own format, which names the file and line)."""
    from m2diff_monai.errors import UserFacingWarning

    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001 (warnings' signature)
        if debug or not issubclass(category, UserFacingWarning):
            return original(message, category, filename, lineno, file, line)
        print(f"{prog}: warning: {one_line(message)}", file=file or sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


def run_guarded(prog: str, body: Callable[[], int | None], *, debug: bool = False, interrupted: str = "") -> int:
    """Run ``body`` and turn its outcome into an exit status and at most one line on stderr (see the module
    docstring). ``interrupted``: what the user should know after Ctrl-C (e.g. "no report written")."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:
        show_traceback = debug_requested(debug)
        if show_traceback:
            traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        bad_input = input_error_in(error)
        if bad_input is not None:
            print_error(prog, bad_input.line())
            return EXIT_INPUT
        if show_traceback:
            where = "traceback above"
        else:
            log = write_error_log(prog, error)
            where = f"traceback in {log}; {DEBUG_HINT}" if log else f"no log could be written; {DEBUG_HINT}"
        print(f"{prog}: internal error: {describe(error)} ({where})", file=sys.stderr, flush=True)
        return EXIT_INTERNAL


def run_cli(
    parser: argparse.ArgumentParser,
    command: Callable[[argparse.Namespace], int | None],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    interrupted: str = "",
) -> int:
    """Parse ``argv`` with ``parser`` (plus ``--debug``) and run ``command(args)`` under :func:`run_guarded`.

    Argument errors end in argparse's usage and ``PROG: error: ...`` with exit 2, as do ``parser.error`` calls
    inside ``command``. ``prog``: the prefix of the error lines (default ``parser.prog``).
    Returns the exit status: ``command``'s return value (None → 0), or 1, 2, 130 as above."""
    add_debug_option(parser)
    args = parser.parse_args(argv)
    name = prog or parser.prog
    with one_line_warnings(name, debug_requested(args.debug)):
        return run_guarded(name, lambda: command(args), debug=args.debug, interrupted=interrupted)


__all__ = [
    "DEBUG_VARIABLE",
    "LOG_DIR_VARIABLE",
    "add_debug_option",
    "debug_requested",
    "describe",
    "exception_chain",
    "input_error_in",
    "one_line",
    "one_line_warnings",
    "print_error",
    "run_cli",
    "run_guarded",
    "write_error_log",
]
