"""The layout's dependency rules, checked by walking every import of model/ and stream/.

- no import circle anywhere;
- ``model`` never imports ``stream`` (the model is a library the stream uses);
- only ``stream.serving`` imports Faust (``faust``, ``mode``, ``aiokafka``);
- runtime code never imports the tooling (``stream.bench``, ``stream.devtools``) or the
  command layer (``stream.cli``), and nothing but the command layer imports it;
- local tooling (``stream.devtools``) never imports the benchmarks.

Imports inside functions and ``TYPE_CHECKING`` blocks count: a circle that only type
checkers see is still a circle for a reader.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

FAUST = ("faust", "mode", "aiokafka")
TOOLING = ("stream.bench", "stream.devtools")
REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a.b`` when that is a
    module of the tree, else as ``a``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = (
        module_name(path, root).rsplit(".", 1)[0]
        if path.name != "__init__.py"
        else module_name(path, root)
    )
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the tree (and third-party top-level names) it imports."""
    paths = [p for top in ("model", "stream") for p in (root / top).rglob("*.py")]
    modules = {module_name(p, root): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imports_of(path, root):
            if imported in modules:
                edges.add(imported)
            elif imported.split(".")[0] in ("model", "stream"):
                continue  # a name from a module, counted through the module itself
            else:
                edges.add(imported.split(".")[0])
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among the tree's modules (one path per circle found)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def _within(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    problems = [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if _within(module, "model") and _within(target, "stream"):
                problems.append(f"{module} imports {target}: model never imports stream")
            if target in FAUST and not _within(module, "stream.serving"):
                problems.append(f"{module} imports {target}: only stream.serving uses Faust")
            runtime = not _within(module, "stream.cli", *TOOLING)
            if runtime and _within(target, *TOOLING):
                problems.append(
                    f"{module} imports {target}: runtime code never imports "
                    "benchmarks or local tooling"
                )
            if _within(target, "stream.cli") and not _within(module, "stream.cli"):
                problems.append(f"{module} imports {target}: nothing imports the command layer")
            if _within(module, "stream.devtools") and _within(target, "stream.bench"):
                problems.append(f"{module} imports {target}: tooling never imports the benchmarks")
    return problems


def test_the_tree_follows_the_dependency_rules() -> None:
    assert violations(REPO) == []


@pytest.mark.parametrize(
    "module,source,complaint",
    [
        ("model/evil.py", "from stream.quality import rank_in\n", "model never imports stream"),
        ("stream/kafka/evil.py", "import faust\n", "only stream.serving uses Faust"),
        (
            "stream/serving/evil.py",
            "def f():\n    from stream.devtools import brokers\n",
            "never imports benchmarks or local tooling",
        ),
        (
            "stream/bench/evil.py",
            "from stream.cli.base import print_json\n",
            "nothing imports the command layer",
        ),
        (
            "stream/serving/evil.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from stream.serving import other\n",
            "import circle",
        ),
    ],
)
def test_each_rule_catches_a_violating_import(
    tmp_path: Path, module: str, source: str, complaint: str
) -> None:
    """The checker on a small tree that breaks one rule (so a green run means something)."""
    for package in (
        "model",
        "stream",
        "stream/serving",
        "stream/kafka",
        "stream/bench",
        "stream/devtools",
        "stream/cli",
    ):
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "stream/quality.py").write_text("")
    (tmp_path / "stream/devtools/brokers.py").write_text("")
    (tmp_path / "stream/cli/base.py").write_text("")
    (tmp_path / "stream/serving/other.py").write_text("from stream.serving import evil\n")
    assert violations(tmp_path) == []
    (tmp_path / module).write_text(textwrap.dedent(source))
    assert any(complaint in problem for problem in violations(tmp_path)), violations(tmp_path)
