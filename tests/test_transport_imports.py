"""transport/ has no import cycle, type-only and lazy imports included (issue 25), and its
sans-IO rule modules (budget, admission, logs) import no asyncio, socket or clock."""

from __future__ import annotations

import ast
from pathlib import Path

TRANSPORT = Path(__file__).resolve().parents[1] / "transport"


def _imports(path: Path) -> set[str]:
    """Sibling transport modules imported anywhere in ``path`` (``from .x import``, ``biopetals.transport.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                out.add(module.split(".")[0])
            elif module.startswith("biopetals.transport."):
                out.add(module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("biopetals.transport.")}
    return out


def test_transport_modules_import_each_other_without_cycles() -> None:
    graph = {p.stem: _imports(p) for p in TRANSPORT.glob("*.py")}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [name]))
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            visit(dep, path + [name])
        state[name] = 2

    for name in graph:
        visit(name, [])
    assert "connection" not in graph["streams"] | graph["unary"]


def test_rule_modules_are_sans_io() -> None:
    for name in ("budget", "admission", "logs"):
        tree = ast.parse((TRANSPORT / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"asyncio", "socket", "time", "selectors"}, (name, imported)
