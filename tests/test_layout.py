"""The package's layout holds: its import graph (every ``import`` of ``src/ivonserve``, at module
level and inside functions; ``if TYPE_CHECKING:`` blocks left out) has no cycle, and the
dependencies point one way: vLLM's plugin imports nothing of ivonserve but itself (vLLM loads
it in every one of its processes), the pure libraries (mbr, answers, predictive, calibration,
choices) nothing of the server or the engine, the engine nothing of the server or the settings,
and no server feature the OpenAI one it serves. Parsing only (``ast``): nothing is imported."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "ivonserve"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, anywhere (functions included), except under TYPE_CHECKING."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@cache
def graph() -> dict[str, set[str]]:
    """module -> the ivonserve modules it imports (``from a import b``: ``a.b`` when that is a
    module, else ``a``). A package's ``__init__``, which Python runs before any of its
    submodules, is an edge only where it is imported itself."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in imports_of(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in paths else base
                    for alias in node.names
                ]
            for target in targets:
                while target and target not in paths:  # `import a.b.c` of a module a.b
                    target = target.rpartition(".")[0]
                if target.startswith("ivonserve") and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def reachable(start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph()[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def modules_under(prefix: str) -> list[str]:
    return sorted(m for m in graph() if m == prefix or m.startswith(prefix + "."))


def test_the_graph_is_read_as_it_should():
    edges = graph()
    assert len(edges) > 40
    assert "ivonserve.errors" in edges["ivonserve.config"]
    assert "ivonserve.engine.args" in edges["ivonserve.config"]  # inside a function
    assert "ivonserve.mbr.methods" in edges["ivonserve.mbr"]  # a relative import
    assert "ivonserve.server.openai.echo" in edges["ivonserve.server.openai.router"]
    assert "ivonserve.config" not in edges["ivonserve.engine.args"]  # TYPE_CHECKING only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_vllms_plugin_imports_nothing_of_ivonserve_but_itself():
    for module in modules_under("ivonserve.vllm_plugin"):
        outside = {t for t in graph()[module] if not t.startswith("ivonserve.vllm_plugin")}
        assert not outside, (module, outside)


@pytest.mark.parametrize(
    "library",
    ["ivonserve.mbr", "ivonserve.answers", "ivonserve.predictive", "ivonserve.calibration",
     "ivonserve.choices"],
)  # fmt: skip
def test_the_pure_libraries_reach_neither_the_server_nor_the_engine(library):
    for module in modules_under(library):
        reached = reachable(module)
        assert not {t for t in reached if t.startswith(("ivonserve.server", "ivonserve.engine"))}


def test_the_engine_reaches_nothing_of_the_server_and_the_features_point_one_way():
    for module in [*modules_under("ivonserve.engine"), "ivonserve.pool"]:
        reached = reachable(module)
        assert not {t for t in reached if t.startswith("ivonserve.server")}, module
        assert "ivonserve.config" not in reached, module  # the engine gets an EngineConfig
    for feature in ("generate", "score"):
        for module in modules_under(f"ivonserve.server.{feature}"):
            reached = reachable(module)
            assert not {t for t in reached if t.startswith("ivonserve.server.openai")}, module
    assert not {t for t in reachable("ivonserve.server.score.serving") if "generate" in t}
    assert not {t for t in reachable("ivonserve.server.generate.serving") if ".score" in t}
