"""The generic JSON table reader (protocol/json_table.py): rows in order, rules at their place.

The manifest's own rules are covered by its vectors (tests/test_vectors_weights.py); these
pin the reader's semantics that the spec's check order (spec/weights.md §2.5) relies on.
"""

from __future__ import annotations

import pytest

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.json_table import (
    POSITION, HexDigest, JsonObject, JsonText, JsonUInt, Key, OneOf, PowerOfTwo, Rule, read_object,
)
from biopetals.protocol.table import ArrayOf, Violation


def _fails(raw: object, table: tuple, context: object = None) -> Violation:
    with pytest.raises(Violation) as info:
        read_object(raw, table, context, "doc")
    return info.value


def _always_broken(values: dict, _: object) -> None:
    raise Violation(ErrorCode.LIMIT_EXCEEDED, "rule ran")


def test_rows_are_checked_in_table_order_and_rules_at_their_place() -> None:
    table = (Key("a", JsonUInt(1, 3)), Rule("after a", _always_broken), Key("b", JsonUInt()))
    broken = _fails({"a": 2, "b": "x"}, table)  # the rule comes before b's type
    assert broken.code == ErrorCode.LIMIT_EXCEEDED and broken.message == "doc: after a: rule ran"
    assert _fails({"a": 9, "b": "x"}, table).code == ErrorCode.INVALID_FIELD
    assert "doc.a: absent" in _fails({"b": 1}, table).message


def test_json_integers_and_strings() -> None:
    version = (Key("v", JsonUInt(1, 1, low=ErrorCode.UNSUPPORTED_VERSION, high=ErrorCode.UNSUPPORTED_VERSION)),)
    assert _fails({"v": 2}, version).code == ErrorCode.UNSUPPORTED_VERSION
    for not_integer in (-1, 1.0, True, None, "1"):
        assert _fails({"v": not_integer}, version).code == ErrorCode.INVALID_FIELD
    assert read_object({"v": 1 << 80}, (Key("v", JsonUInt()),), None, "doc") == {"v": 1 << 80}
    assert _fails({"v": 3 << 20}, (Key("v", PowerOfTwo(1 << 20, 16 << 20)),)).code == ErrorCode.INVALID_FIELD
    text = (Key("t", JsonText(1, 3)),)
    assert read_object({"t": "\u00e9\u00e9\u00e9"}, text, None, "doc") == {"t": "\u00e9\u00e9\u00e9"}  # characters
    for bad in ("", "abcd", "\ud800", 7):
        assert _fails({"t": bad}, text).code == ErrorCode.INVALID_FIELD
    named = (Key("t", JsonText(reserved=frozenset({"config.json"}), reserved_endings=(".tmp",))),)
    for reserved in ("config.json", "a.tmp"):
        assert _fails({"t": reserved}, named).code == ErrorCode.INVALID_FIELD
    assert _fails({"d": ["F32"]}, (Key("d", OneOf(frozenset({"F32"}))),)).code == ErrorCode.INVALID_FIELD


def test_array_limit_then_count_then_items() -> None:
    def two(values: dict, _: object) -> int:
        return 2

    table = (Key("h", ArrayOf(HexDigest(), 3, high=ErrorCode.LIMIT_EXCEEDED), count=two, items="hashes"),)
    assert _fails({"h": ["x"] * 4}, table).code == ErrorCode.LIMIT_EXCEEDED
    assert "1 hashes; need 2" in _fails({"h": ["x"]}, table).message  # the count before the bad item
    assert "doc.h[1]" in _fails({"h": ["0" * 64, "x"]}, table).message
    assert read_object({"h": ["0" * 64, "f" * 64]}, table, None, "doc") == {"h": (bytes(32), b"\xff" * 32)}


def test_nested_objects_get_their_position_and_share_the_context() -> None:
    def record(entry: dict, seen: list) -> None:
        seen.append((entry[POSITION], entry["n"]))

    item = JsonObject((Key("n", JsonUInt()), Rule("record", record)))
    table = (Key("kind", JsonText()), Key("xs", ArrayOf(item, 10), when=lambda values, _: values["kind"] == "x"))
    seen: list = []
    assert read_object({"kind": "y", "xs": "ignored"}, table, seen, "doc") == {"kind": "y"}
    values = read_object({"kind": "x", "xs": [{"n": 5}, {"n": 6}]}, table, seen, "doc")
    assert seen == [(0, 5), (1, 6)] and values["xs"][1] == {POSITION: 1, "n": 6}
    assert "doc.xs[1]: expected an object" in _fails({"kind": "x", "xs": [{"n": 1}, []]}, table, []).message
