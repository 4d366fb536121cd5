"""No import cycles among the modules of ``m2diff_monai`` and ``preprocessing``.

Why: a cycle means two modules own one concept between them (the diffusion base class once built its own
subclass), and it makes import order matter. The graph is read from the source with ``ast``, imports inside
functions included (a function-level import only hides a cycle until the function runs). ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg``; dynamic ``importlib`` imports are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("m2diff_monai", "preprocessing")


def package_modules(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest module prefix of a dotted name among the package's modules (None: an outside import)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its body (relative imports made absolute)."""
    found: set[str | None] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_owner(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else _owner(source, modules))
    return {name for name in found if name and name != module}


def import_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> nx.DiGraph:
    modules = package_modules(root, packages)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for module, path in modules.items():
        graph.add_edges_from((module, target) for target in imported_modules(module, path, modules))
    return graph


def import_cycles(graph: nx.DiGraph) -> list[set[str]]:
    """Each set of modules that import one another (directly or around a loop)."""
    return [set(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def test_no_import_cycles():
    graph = import_graph()
    assert graph.number_of_edges() > 100, "the import graph lost its edges: the parser is broken"
    cycles = [sorted(c) for c in import_cycles(graph)]
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert graph.has_edge("m2diff_monai.diffusion.config", "m2diff_monai.diffusion.respace")  # `from .respace import`
    assert graph.has_edge("m2diff_monai.diffusion.clip", "m2diff_monai.data.manifest")  # only in a function
    assert graph.has_edge("m2diff_monai.inference.api", "preprocessing.intake")  # across the two packages
    assert not graph.has_edge("m2diff_monai.diffusion.gaussian_diffusion", "m2diff_monai.diffusion.respace")


def test_a_cycle_closed_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("from .spaced import Spaced\n")
    (package / "spaced.py").write_text("def build():\n    from pkg.base import Base\n    return Base\n")
    (package / "leaf.py").write_text("import pkg.base\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert import_cycles(graph) == [{"pkg.base", "pkg.spaced"}]
    assert graph.has_edge("pkg.leaf", "pkg.base")
