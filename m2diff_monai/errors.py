"""The one error type users see for bad input: one line naming the subject, the file and the problem; and the
warning category the command line tools print as one line."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input. ``str(err)`` is the single line a CLI prints before exiting non-zero."""

    def __init__(self, problem: str, subject: str | None = None, path: str | Path | None = None):
        self.problem = problem
        self.subject = subject
        self.path = None if path is None else str(path)
        super().__init__(self.line())

    def line(self) -> str:
        where = []
        if self.subject:
            where.append(f"subject {self.subject}")
        if self.path:
            where.append(f"file {self.path}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.problem}" if prefix else self.problem


class UserFacingWarning(UserWarning):
    """A warning meant for the person running a command (e.g. a sampler start above the steps a checkpoint was
    trained on). The CLIs print it as ``PROG: warning: <one line>`` (``cli_runner.one_line_warnings``)."""
