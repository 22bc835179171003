"""Declarative tables for JSON documents: the manifest's objects read like the wire maps.

The JSON-keyed counterpart of ``WireStruct`` (protocol/table.py) for a document that
``json`` has already decoded under its strictness hooks and size bound (spec/weights.md
§2.5 steps 1-3). A table is a tuple of rows in the spec's check order: a ``Key`` (a field:
its key, a kind of protocol/table.py or of this module, and optionally the exact item count
of an array or the condition under which the field exists) or a ``Rule`` (a named cross-field
rule, at its place in the order, as ``WireStruct._check_rules`` is for a map). ``read_object``
is the one routine that reads an object by its table, nested objects and arrays of objects
included; it raises ``Violation`` for the first rule broken.

JSON integers have no width and JSON strings are counted in characters (spec/weights.md
§2.2), so the few JSON kinds here differ from their msgpack cousins in exactly that.
Sans-IO: values in, values out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.table import ArrayOf, Kind, UInt, Violation

__all__ = ["JsonUInt", "PowerOfTwo", "JsonText", "OneOf", "HexDigest", "AnyObject", "JsonObject",
           "Key", "Rule", "POSITION", "read_object"]

#: The key under which ``read_object`` gives an object read from an array its position there.
POSITION: Final = "#"

_BAD = ErrorCode.INVALID_FIELD


@dataclass(frozen=True)
class JsonUInt(UInt):
    """A JSON integer (no fraction, no exponent, not ``true``) that is ``>= 0``, in ``[lo, hi]``.

    A negative number is not an integer (``INVALID_FIELD``), whatever ``low`` says."""

    hi: int | float = math.inf  # JSON integers have no width

    def decode(self, raw: object) -> int:
        if type(raw) is not int or raw < 0:
            raise Violation(_BAD, f"expected a non-negative integer, got {_show(raw)}")
        return super().decode(raw)


@dataclass(frozen=True)
class PowerOfTwo(JsonUInt):
    """A ``JsonUInt`` in ``[lo, hi]`` that is a power of two."""

    def decode(self, raw: object) -> int:
        value = super().decode(raw)
        if value & (value - 1):
            raise Violation(_BAD, f"{value} is not a power of two")
        return value


@dataclass(frozen=True)
class JsonText(Kind):
    """A JSON string of ``lo..hi`` characters, valid Unicode (no lone surrogate), matching
    ``pattern`` whole when given, none of the ``reserved`` names and ending with none of the
    ``reserved_endings``."""

    lo: int = 0
    hi: int | float = math.inf
    pattern: re.Pattern | None = None
    reserved: frozenset[str] = frozenset()
    reserved_endings: tuple[str, ...] = ()

    def decode(self, raw: object) -> str:
        if type(raw) is not str:
            raise Violation(_BAD, f"expected a string, got {_show(raw)}")
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError:
            raise Violation(_BAD, "not valid Unicode (a lone surrogate)") from None
        if not self.lo <= len(raw) <= self.hi:
            raise Violation(_BAD, f"{raw[:80]!r}: not {self.lo} to {self.hi} characters")
        if self.pattern is not None and not self.pattern.fullmatch(raw):
            raise Violation(_BAD, f"{raw[:80]!r}: does not match {self.pattern.pattern}")
        if raw in self.reserved or raw.endswith(self.reserved_endings):
            raise Violation(_BAD, f"{raw[:80]!r}: a reserved name")
        return raw


@dataclass(frozen=True)
class OneOf(Kind):
    """A JSON string from a fixed set of names."""

    names: frozenset[str]

    def decode(self, raw: object) -> str:
        if type(raw) is not str or raw not in self.names:
            raise Violation(_BAD, f"{_show(raw)}: not one of {sorted(self.names)}")
        return raw


@dataclass(frozen=True)
class HexDigest(Kind):
    """A SHA-256 as 64 lower-case hex digits; Python value: its 32 bytes."""

    def decode(self, raw: object) -> bytes:
        if type(raw) is not str or not _HEX64.fullmatch(raw):
            raise Violation(_BAD, "expected 64 lower-case hex digits")
        return bytes.fromhex(raw)


_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class AnyObject(Kind):
    """A JSON object of any content (a checkpoint's ``config.json``); its rules are ``Rule`` rows."""

    def decode(self, raw: object) -> dict:
        if type(raw) is not dict:
            raise Violation(_BAD, f"expected an object, got {_show(raw)}")
        return raw


@dataclass(frozen=True)
class JsonObject(Kind):
    """A JSON object read by its own table; Python value: the dict of its rows' values."""

    table: tuple[Key | Rule, ...]


@dataclass(frozen=True)
class Key:
    """A field row: ``kind`` reads ``obj[key]``; absent is ``INVALID_FIELD``.

    ``when``: the row exists only when it says so (given the values read so far and the
    context). ``count``: an array's exact item count, checked after its limit ``hi`` and
    before its items."""

    key: str
    kind: Kind
    when: Callable[[dict[str, Any], Any], bool] | None = None
    count: Callable[[dict[str, Any], Any], int] | None = None
    items: str = "items"  # what the array's items are, for the messages


@dataclass(frozen=True)
class Rule:
    """A named cross-field rule at its place in the check order: ``check(values, context)``
    raises ``Violation`` (it may also record what later rules need, in ``context``)."""

    name: str
    check: Callable[[dict[str, Any], Any], None]


def read_object(raw: object, table: tuple[Key | Rule, ...], context: Any, where: str,
                position: int | None = None, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check ``raw`` against ``table`` row by row; the first broken rule raises ``Violation``
    (its text prefixed with where it was found). Returns the values read, in ``values`` when
    given (so that the context can hold the top-level values its nested rules need)."""
    if type(raw) is not dict:
        raise Violation(_BAD, f"{where}: expected an object, got {_show(raw)}")
    values = {} if values is None else values
    if position is not None:
        values[POSITION] = position
    for row in table:
        if isinstance(row, Rule):
            try:
                row.check(values, context)
            except Violation as exc:
                raise Violation(exc.code, f"{where}: {row.name}: {exc.message}") from None
            continue
        if row.when is not None and not row.when(values, context):
            continue
        at = f"{where}.{row.key}"
        if row.key not in raw:
            raise Violation(_BAD, f"{at}: absent")
        values[row.key] = _read(row, raw[row.key], values, context, at)
    return values


def _read(row: Key, raw: object, values: dict[str, Any], context: Any, at: str) -> Any:
    kind = row.kind
    if isinstance(kind, JsonObject):
        return read_object(raw, kind.table, context, at)
    try:
        if not isinstance(kind, ArrayOf):
            return kind.decode(raw)
        if type(raw) is not list:
            raise Violation(_BAD, f"expected an array, got {_show(raw)}")
        if len(raw) > kind.hi:
            raise Violation(kind.high, f"{len(raw)} {row.items} > maximum {kind.hi}")
        if row.count is not None and len(raw) != (count := row.count(values, context)):
            raise Violation(_BAD, f"{len(raw)} {row.items}; need {count}")
    except Violation as exc:
        raise Violation(exc.code, f"{at}: {exc.message}") from None
    if isinstance(kind.item, JsonObject):
        return tuple(read_object(item, kind.item.table, context, f"{at}[{i}]", i) for i, item in enumerate(raw))
    try:
        return kind.decode(raw)
    except Violation as exc:
        raise Violation(exc.code, f"{at}{exc.message}") from None


def _show(value: object) -> str:
    return f"{value[:40]!r}" if isinstance(value, str) else type(value).__name__
