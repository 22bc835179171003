"""Every MUST of spec/ is mapped to a conformance check, a vector or a named test (spec/README.md §5.2).

``spec/check_must_map.py`` extracts the MUST sentences and checks spec/conformance-map.md;
these tests run it, show that it does find an unmapped MUST and a broken reference, and
that every conformance check names a section that exists.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def must_map(monkeypatch, tmp_path):
    """The checker module, reading a copy of spec/ in tmp_path (so a test may edit it)."""
    spec = importlib.util.spec_from_file_location("check_must_map", ROOT / "spec" / "check_must_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    copy = tmp_path / "spec"
    shutil.copytree(ROOT / "spec", copy)
    monkeypatch.setattr(module, "SPEC", copy)
    monkeypatch.setattr(module, "MAP", copy / "conformance-map.md")
    return module


def test_every_must_is_mapped(must_map):
    unmapped, lines = must_map.report()
    assert lines[1:] == [] and unmapped == 0, "\n".join(lines)
    assert int(lines[0].split()[0]) > 100  # the extractor found the spec's MUSTs


def test_the_checker_finds_an_unmapped_must_and_broken_references(must_map):
    doc = must_map.SPEC / "transport.md"
    doc.write_text(doc.read_text() + "\n## 9. Test section\n\nA peer MUST do a new thing.\n")
    text = must_map.MAP.read_text()
    text = text.replace("check:dht.ping", "check:dht.no-such-check", 1)
    text = text.replace("vector:dht.json;", "vector:dht.json#no such vector;", 1)
    text = text.replace("test:tests/test_mux.py::test_too_many_streams_are_reset_not_fatal",
                        "test:tests/test_mux.py::test_that_does_not_exist", 1)
    must_map.MAP.write_text(text)
    unmapped, lines = must_map.report()
    assert unmapped == 1
    assert any(line.startswith("unmapped: transport§9-") and "new thing" in line for line in lines)
    for what in ("no conformance check 'dht.no-such-check'", "no vector 'no such vector' in dht.json",
                 "no test tests/test_mux.py::test_that_does_not_exist"):
        assert any(what in line for line in lines), (what, lines)


def test_an_edited_must_must_be_mapped_again(must_map):
    doc = must_map.SPEC / "messages.md"
    text = doc.read_text()
    assert text.count("session at most once.") == 1
    doc.write_text(text.replace("session at most once.", "session at most twice."))
    unmapped, lines = must_map.report()
    assert unmapped == 1 and any("stale: messages§5.7-" in line for line in lines)
