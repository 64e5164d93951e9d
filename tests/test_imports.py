"""The project's modules import one another without a circle: an import inside a function counts too, since it
ties the two modules together as much as one at the top of the file does."""

from __future__ import annotations

import ast

from conftest import REPO

STAGES = ("train_expert.py", "embed_tasks.py", "interpolate.py", "evaluate.py")


def project_imports() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: the line of the first such import}, read from the source with
    ast: `import common.x`, `from common.x import y` and `from common import x`, at any depth of the file."""
    files = {f"common.{p.stem}": p for p in sorted((REPO / "common").glob("*.py"))}
    files |= {name.removesuffix(".py"): REPO / name for name in STAGES}
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "common":
                names = [f"common.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                if name in files and name != module:
                    edges.setdefault(name, node.lineno)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One circle of imports as [a, b, ..., a], or [] when there is none (depth-first, grey/black marks)."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module) :] + [module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return []


def test_the_reader_sees_every_kind_of_import():
    """The graph holds top-level and in-function imports in each of their spellings
    (else a circle could hide)."""
    graph = project_imports()
    assert "common.errors" in graph["common.config"]  # from common.errors import UserError, at the top
    assert "common.dist" in graph["common.artifacts"]  # from common import dist
    assert "common.similarity" in graph["common.report"]  # inside _whole, off the start-up of `common.report`
    assert "common.stage" in graph["train_expert"] and "common.report" in graph["evaluate"]


def test_no_import_circle():
    graph = project_imports()
    cycle = find_cycle(graph)
    where = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import circle: " + ", ".join(where) + "; move what the lower module needs below it"


def test_a_cycle_is_found():
    """The search itself: a circle of three is reported from where it closes; a diamond is none."""
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}) == []
