"""The layer table of spec/README.md §2, enforced: every import of the package, no import cycle,
and a library import that changes nothing in the process environment.

Imports are read with ``ast`` from every module of every folder, at any depth: lazy imports inside
functions and type-only imports under ``if TYPE_CHECKING:`` count like top-level ones (a cycle
hidden by a lazy import is still a cycle of the design). The table is parsed from the spec itself,
so the spec and this test cannot drift apart.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from biopetals.protocol.program_env import PROGRAM_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "spec/README.md"

# Known cycles being removed on another branch (issue 25: transport/streams and transport/unary
# import transport/connection for type hints while it imports them). Each entry is the import that
# closes the cycle; the lead deletes these entries when that branch is merged.
KNOWN_CYCLE_EDGES = {
    ("biopetals.transport.streams", "biopetals.transport.connection"),  # transport/streams <-> transport/connection
    ("biopetals.transport.unary", "biopetals.transport.connection"),  # transport/unary <-> transport/connection
}

# The programs' entry modules (pyproject's [project.scripts] and the demo): they, and only they,
# set process settings when imported (protocol/program_env.py).
PROGRAMS = {
    "biopetals.node.cli", "biopetals.dht.cli", "biopetals.transport.keygen", "biopetals.client.status",
    "biopetals.client.demo", "biopetals.conformance.cli", "biopetals.api.cli", "biopetals.api.demo", "biopetals.weights.cli",
}


def _folders() -> dict[str, Path]:
    """Package folder name -> its directory, from pyproject's package-dir."""
    dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name.split(".", 1)[1]: ROOT / folder for name, folder in dirs.items()}


def _layer_table() -> dict[str, tuple[set[str], dict[str, set[str]]]]:
    """spec/README.md §2: folder -> (folders it may import, {folder: the only modules allowed})."""
    text = README.read_text()
    section = text[text.index("## 2. Layers"):text.index("### 2.1")]
    table: dict[str, tuple[set[str], dict[str, set[str]]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)/`", cells[0]) if len(cells) == 4 else None
        if not match:
            continue
        allowed: set[str] = set()
        only: dict[str, set[str]] = {}
        for folder, note in re.findall(r"`(\w+)/`(?:\s*\(([^)]*)\))?", cells[3]):
            allowed.add(folder)
            if note and "only" in note:  # "(`a`, `b` only: why)": just those modules of the folder
                only[folder] = set(re.findall(r"`(\w+)`", note.split("only")[0]))
        table[match[1]] = (allowed, only)
    return table


def _module_name(folder: str, path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["biopetals", folder, *parts])


def _imports() -> dict[str, list[tuple[str, int]]]:
    """Every module of the package -> the biopetals modules (or packages) it imports, with line numbers."""
    modules: dict[str, Path] = {}
    for folder, base in _folders().items():
        for path in sorted(base.rglob("*.py")):
            modules[_module_name(folder, path, base)] = path
    out: dict[str, list[tuple[str, int]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(a.name, node.lineno) for a in node.names if a.name.startswith("biopetals.")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("biopetals."):
                    for alias in node.names:  # `from pkg import module` imports the module
                        sub = f"{target}.{alias.name}"
                        found.append((sub if sub in modules else target, node.lineno))
        out[name] = found
    return out


IMPORTS = _imports()


def test_the_table_lists_every_folder() -> None:
    assert set(_layer_table()) == set(_folders())


def test_every_import_follows_the_layer_table() -> None:
    table = _layer_table()
    broken = []
    for module, targets in IMPORTS.items():
        folder = module.split(".")[1]
        allowed, only = table[folder]
        for target, line in targets:
            other = target.split(".")[1]
            if other == folder:
                continue
            if other not in allowed:
                broken.append(f"{module}:{line} imports {target}: {folder}/ may not import {other}/")
            elif other in only and target.split(".")[2:3] and target.split(".")[2] not in only[other]:
                broken.append(f"{module}:{line} imports {target}: {folder}/ may import only {sorted(only[other])} of {other}/")
    assert broken == [], "\n".join(broken)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle() -> None:
    graph = {m: {t for t, _ in targets if t in IMPORTS and t != m} for m, targets in IMPORTS.items()}
    for source, target in KNOWN_CYCLE_EDGES:
        assert target in graph[source], f"{source} no longer imports {target}: delete it from KNOWN_CYCLE_EDGES"
        graph[source].discard(target)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_lazy_cycle() -> None:
    """The check itself: a cycle through three modules is one component."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


_PROBE = """
import importlib, os, sys
root, names = sys.argv[1], sys.argv[2:]
ours = []  # (variable, file) set or deleted by code of this repository (not by third-party libraries)
cls = type(os.environ)
set_item, del_item = cls.__setitem__, cls.__delitem__

def caller():
    frame = sys._getframe(3)  # above caller(), record() and the patched method
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")  # os, _collections_abc
                                 or frame.f_code.co_filename.endswith(("/_collections_abc.py", "/os.py"))):
        frame = frame.f_back
    return "?" if frame is None else frame.f_code.co_filename

def record(key):
    name = caller()
    if name.startswith(root) and "/.venv/" not in name and "/site-packages/" not in name:
        ours.append((key, name))

def setitem(self, key, value):
    record(key)
    set_item(self, key, value)

def delitem(self, key):
    record(key)
    del_item(self, key)

cls.__setitem__, cls.__delitem__ = setitem, delitem
for name in names:
    importlib.import_module(name)
print("CHANGED", sorted(set(ours)))
"""


def test_importing_the_library_changes_no_environment_variable() -> None:
    """Every library module, imported in a fresh interpreter, sets no environment variable
    (spec/README.md §2); only the programs apply settings (protocol/program_env.py). What
    third-party libraries do on import (torch sets TORCHINDUCTOR_CACHE_DIR) is theirs."""
    library = sorted(m for m in IMPORTS if m not in PROGRAMS)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), *library], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "CHANGED []"


def test_the_probe_sees_a_program_set_the_environment() -> None:
    """The check itself: importing a program is seen setting the variables (in a fresh interpreter)."""
    env = {k: v for k, v in os.environ.items() if k not in PROGRAM_ENVIRONMENT}
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), "biopetals.weights.cli"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all(name in out.stdout for name in PROGRAM_ENVIRONMENT)


def test_no_library_module_imports_a_program() -> None:
    """A program module sets the process environment when imported: the library never imports one."""
    wrong = [f"{m}:{line} imports the program {t}" for m, targets in IMPORTS.items() if m not in PROGRAMS
             for t, line in targets if t in PROGRAMS]
    assert wrong == []


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_each_program_is_an_entry_point_that_applies_the_environment(program: str) -> None:
    """Each program module calls apply_program_environment() at its top, before other imports."""
    folder, rest = program.split(".")[1], program.split(".")[2:]
    path = _folders()[folder].joinpath(*rest).with_suffix(".py")
    tree = ast.parse(path.read_text())
    calls = [n for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", None) == "apply_program_environment"]
    assert calls, f"{path} does not call apply_program_environment() at module level"
    before = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno < calls[0].lineno]
    for node in before:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        assert all(n in sys.stdlib_module_names or n in ("__future__", "biopetals.protocol.program_env")
                   for n in (x.split(".")[0] if not x.startswith("biopetals") else x for x in names)), \
            f"{path}:{node.lineno} imports {names} before applying the program environment"
