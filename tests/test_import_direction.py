"""``preprocessing/`` and ``m2diff_monai`` import each other one way only (docs/ARCHITECTURE.md, "Layers"):
preprocessing may use m2diff_monai's foundations, m2diff_monai's upper layers may use preprocessing, never the
reverse. Read from the source (every import statement, also those inside functions), so a lazy import cannot hide
a loop."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The m2diff_monai layers built on preprocessing (they register, normalize and crop scans the pipeline's way).
UPPER = ("engines", "inference", "evaluation", "export", "deploy")
# What preprocessing builds on; none of it may import preprocessing.
FOUNDATIONS = ("errors", "io", "runtime", "data", "diffusion", "networks", "shipped")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def test_preprocessing_uses_no_upper_layer_of_m2diff_monai():
    upper = tuple(f"m2diff_monai.{layer}" for layer in UPPER)
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in imported_modules(path) if n.startswith(upper))
        for path in _sources(REPO / "preprocessing")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"preprocessing/ imports m2diff_monai's upper layers: {offenders}"
    assert any("m2diff_monai.errors" in imported_modules(p) for p in _sources(REPO / "preprocessing"))


def test_foundations_of_m2diff_monai_do_not_import_preprocessing():
    package = REPO / "m2diff_monai"
    files = [
        p
        for name in FOUNDATIONS
        for p in ([package / f"{name}.py"] if (package / f"{name}.py").is_file() else _sources(package / name))
    ]
    assert len(files) > len(FOUNDATIONS)  # the folders exist and hold modules
    offenders = {
        str(p.relative_to(REPO)): sorted(n for n in imported_modules(p) if n.split(".")[0] == "preprocessing")
        for p in files
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"m2diff_monai foundations import preprocessing (a loop): {offenders}"
    assert any(n.startswith("preprocessing") for n in imported_modules(package / "inference" / "preprocess.py"))
