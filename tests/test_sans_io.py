"""protocol/ is sans-IO (DESIGN.md, STYLE.md habit 1): no sockets, no event loop, no clock.

Walks the AST of every protocol/*.py, so files added later are checked too. It looks at
``import x`` / ``from x import y`` anywhere in a module (also inside functions), and at
``importlib.import_module("x")`` / ``__import__("x")`` calls with a literal name. The
clock is forbidden as ``time`` and ``datetime``: time is an argument (``now: float``).
protocol/ also imports nothing from the layers above it (DESIGN.md, "Layers").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROTOCOL = Path(__file__).resolve().parent.parent / "protocol"
FILES = sorted(PROTOCOL.glob("*.py"))

FORBIDDEN = {
    "asyncio": "event loop",
    "socket": "socket I/O",
    "selectors": "socket I/O",
    "select": "socket I/O",
    "ssl": "socket I/O",
    "socketserver": "socket I/O",
    "trio": "event loop",
    "anyio": "event loop",
    "time": "clock (pass `now` as an argument)",
    "datetime": "clock (pass `now` as an argument)",
}
UPPER_LAYERS = {"transport", "dht", "node", "client", "models"}


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # relative import: `from ..transport import x` leaves the package
            if node.level > 1 and node.module:
                found.append((node.lineno, "biopetals." + node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for line, module in imported_modules(tree):
        parts = module.split(".")
        if parts[0] in FORBIDDEN:
            out.append(f"{path.name}:{line} imports {module} ({FORBIDDEN[parts[0]]})")
        if parts[0] == "biopetals" and len(parts) > 1 and parts[1] in UPPER_LAYERS:
            out.append(f"{path.name}:{line} imports {module} (protocol/ must not depend on upper layers)")
    return out


def test_protocol_folder_has_modules():
    assert any(f.name == "tensors.py" for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_protocol_module_is_sans_io(path):
    assert violations(path) == []


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import asyncio\n"
        "from socket import socket\n"
        "def f():\n"
        "    import time\n"
        "    from datetime import datetime\n"
        "    importlib.import_module('selectors')\n"
        "from biopetals.transport.mux import Mux\n"
        "import os, struct\n"
    )
    found = violations(bad)
    assert len(found) == 6, found
