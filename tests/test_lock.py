"""The lock (constraints.txt) pins everything pyproject.toml asks for, within its bounds, and is what runs.

A fresh install resolved a new transformers once and generate() went wrong while the
tests of the day had passed; the README's commands and .ci/run install with
``-c constraints.txt`` so that cannot happen again. These checks keep the lock whole.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: every line pins one release with ==, not {line!r}"
        pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in ("demo", "quant", "api", "test"):
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra] if not r.startswith("biopetals")]
    return reqs


def test_every_declared_dependency_is_locked_within_its_bounds():
    pins = locked()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt locks {req.name}=={pins[name]}, outside pyproject's {req.specifier}"


def test_declared_dependencies_have_upper_bounds():
    """pyproject's upper bounds say what is tested: a bare >= would admit any future release."""
    for req in declared():
        assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), \
            f"{req.name} has no upper bound in pyproject.toml ({req.specifier or 'any version'})"


def test_this_environment_runs_the_locked_set():
    """The test run itself used the lock (a local build label such as torch's +cpu aside)."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip("not the README's .venv (e.g. scripts/check_newest.py): versions differ on purpose")
    wrong = []
    for name, version in locked().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} not installed")
            continue
        if installed.public != str(version) and installed != version:
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, "installed without -c constraints.txt? " + ", ".join(wrong)
