"""No source module of ``m2diff_monai`` or ``preprocessing`` grows past 500 lines.

Why: a long module is how one file ends up owning several concepts (``evaluation/run.py`` once held options,
NIfTI reading, grid math, scoring, ~260 lines of Markdown and the run itself). docs/ARCHITECTURE.md promises one
concept per module; past ~500 lines that promise is rarely kept. A module may stay longer only when it is named
below with the reason.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("m2diff_monai", "preprocessing")
MAX_LINES = 500

#: Modules allowed past MAX_LINES, and why. Shrink this list; never grow it without a reason a reviewer accepts.
ALLOWED_LONG: dict[str, str] = {}


def line_counts(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, int]:
    """``{path relative to the repository: number of lines}`` of every ``.py`` file of ``packages``."""
    counts = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            counts[path.relative_to(root).as_posix()] = len(path.read_text(encoding="utf-8").splitlines())
    return counts


def test_no_module_is_longer_than_the_limit():
    counts = line_counts()
    assert len(counts) > 50, "the package walk found too few modules: the paths are wrong"
    too_long = {path: n for path, n in counts.items() if n > MAX_LINES and path not in ALLOWED_LONG}
    assert not too_long, f"modules over {MAX_LINES} lines (split them or add a reason to ALLOWED_LONG): {too_long}"


def test_the_allow_list_names_only_existing_long_modules():
    """An entry whose module was split (or removed) must leave the list, so the list only shrinks."""
    counts = line_counts()
    stale = sorted(path for path in ALLOWED_LONG if counts.get(path, 0) <= MAX_LINES)
    assert not stale, f"ALLOWED_LONG names modules that are now short or gone; remove them: {stale}"


def test_the_line_count_sees_a_long_module(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (package / "short.py").write_text("x = 1\n")
    assert line_counts(tmp_path, ("pkg",)) == {"pkg/long.py": MAX_LINES + 1, "pkg/short.py": 1}
