"""Declarative field tables: the one way every BioPetals wire map is defined and read.

A map (a node-protocol message, a ``Hop``, an announcement, a provider record, a DHT message,
contact or record, the handshake payload) is a ``WireStruct`` dataclass whose fields are declared
with ``wire(key, kind)``; ``_decode_body`` checks a map built by the bounded reader
(protocol/reader.py) against that table in ascending key order, each field completely before
the next (spec/messages.md §2.5 step 7), then the struct's cross-field rules; ``_encode_body``
writes the canonical map (§2.3). No wire map has hand-written decoding code.
The JSON manifest's objects are tables of the same kinds, keyed by strings
(protocol/json_table.py).

The scalar kinds live here and load nothing heavy (the DHT and the handshake use them); the
tensor kinds are in protocol/fields.py. A kind signals a broken rule with ``Violation`` (an
ErrorCode and a text); the caller turns it into ``RemoteProtocolError`` for a peer's bytes, or
into ``LocalProtocolError`` when our own code constructs an invalid value.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from biopetals.protocol.codec_names import Codec
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.multiaddr import Multiaddr

__all__ = [
    "Violation", "Kind", "UInt", "ErrorCodeKind", "Float", "Text", "Blob", "PeerIdText", "MultiaddrText",
    "ArrayOf", "Nested", "WireField", "wire", "WireStruct", "U64_MAX",
]

U64_MAX: Final = (1 << 64) - 1

class Violation(Exception):
    """A broken rule found while checking a field (internal; never escapes the codecs)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Kind:
    """One kind of field. ``absent`` is the Python value of an omitted optional field."""

    absent: Any = None

    def decode(self, raw: object) -> Any:
        """Wire value (as msgpack built it) to Python value: type, range, nested rules."""
        raise NotImplementedError

    def check(self, value: object) -> Any:
        """Validate (and normalise) a Python value given to a message constructor."""
        raise NotImplementedError

    def encode(self, value: Any, codec: Codec | None) -> object:
        """Python value to a msgpack-ready value, canonical (spec/messages.md §2.3)."""
        return value


@dataclass(frozen=True)
class UInt(Kind):
    """``uint`` in ``[lo, hi]``; ``low``/``high`` are the codes for a value below/above."""

    lo: int = 0
    hi: int = U64_MAX
    low: ErrorCode = ErrorCode.INVALID_FIELD
    high: ErrorCode = ErrorCode.INVALID_FIELD

    def decode(self, raw: object) -> int:
        if type(raw) is not int:  # bool is an int subclass; it is not a msgpack int
            raise Violation(ErrorCode.INVALID_FIELD, f"expected an unsigned integer, got {_kind(raw)}")
        if raw < self.lo:
            raise Violation(self.low, f"{raw} < minimum {self.lo}")
        if raw > self.hi:
            raise Violation(self.high, f"{raw} > maximum {self.hi}")
        return raw

    def check(self, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return self.decode(int(value))
        return self.decode(value)


@dataclass(frozen=True)
class ErrorCodeKind(UInt):
    """An error code: a ``uint``; known numbers become ``ErrorCode``, unknown ones stay ints."""

    def decode(self, raw: object) -> int:
        number = super().decode(raw)
        try:
            return ErrorCode(number)
        except ValueError:
            return number  # a code from a newer peer (spec/messages.md §2.4)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return int(value)


@dataclass(frozen=True)
class Float(Kind):
    """``float``, finite, ``>= lo`` (or ``> lo`` when ``exclusive``)."""

    lo: float = 0.0
    exclusive: bool = False

    def decode(self, raw: object) -> float:
        if type(raw) is not float:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a float, got {_kind(raw)}")
        if not math.isfinite(raw):
            raise Violation(ErrorCode.INVALID_FIELD, f"{raw} is not finite")
        if raw < self.lo or (self.exclusive and raw == self.lo):
            relation = ">" if self.exclusive else ">="
            raise Violation(ErrorCode.INVALID_FIELD, f"{raw} is not {relation} {self.lo}")
        return raw

    def check(self, value: object) -> float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return self.decode(value)


@dataclass(frozen=True)
class _Sized(Kind):
    """A ``str`` or ``bin`` of ``lo..hi`` bytes; ``low``/``high`` are the codes for a size below/above."""

    lo: int
    hi: int
    low: ErrorCode = ErrorCode.INVALID_FIELD
    high: ErrorCode = ErrorCode.LIMIT_EXCEEDED

    def _check_size(self, size: int, what: str) -> None:
        if size < self.lo:
            raise Violation(self.low, f"{what}{size} bytes < minimum {self.lo}")
        if size > self.hi:
            raise Violation(self.high, f"{what}{size} bytes > maximum {self.hi}")


@dataclass(frozen=True)
class Text(_Sized):
    """``str`` of ``lo..hi`` UTF-8 bytes."""

    def decode(self, raw: object) -> str:
        if type(raw) is not str:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a str, got {_kind(raw)}")
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: only a local caller can produce them
            raise Violation(ErrorCode.INVALID_FIELD, "string is not valid UTF-8") from None
        self._check_size(size, "string of ")
        return raw

    check = decode


@dataclass(frozen=True)
class PeerIdText(Text):
    """A peer id as base58btc text (spec/transport.md §1.3); Python value: ``PeerId``."""

    def decode(self, raw: object) -> PeerId:
        return _parse(_peer_id_from_text, Text.decode(self, raw))

    def check(self, value: object) -> PeerId:
        return value if isinstance(value, PeerId) else self.decode(value)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return str(value)


@dataclass(frozen=True)
class MultiaddrText(Text):
    """A multiaddr as text (spec/transport.md §1.7); Python value: ``Multiaddr``."""

    def decode(self, raw: object) -> Multiaddr:
        return _parse(_multiaddr_from_text, Text.decode(self, raw))

    def check(self, value: object) -> Multiaddr:
        return value if isinstance(value, Multiaddr) else self.decode(value)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return str(value)


# Every step of a push chain names the same few peers: parsing a peer id (base58 and key
# checks, ~150 us) once per distinct text keeps it off the per-token path. Both parsers
# are pure; errors are not cached, so bad input costs the same every time.
_peer_id_from_text = functools.lru_cache(maxsize=1024)(PeerId.from_base58)
_multiaddr_from_text = functools.lru_cache(maxsize=1024)(Multiaddr.parse)


def _parse(parser: Callable[[str], Any], text: str) -> Any:
    try:
        return parser(text)
    except ProtocolError as exc:  # the transport's parsers say INVALID_FIELD
        raise Violation(ErrorCode(exc.code), exc.message) from None


@dataclass(frozen=True)
class Blob(_Sized):
    """``bin`` of ``lo..hi`` bytes."""

    def decode(self, raw: object) -> bytes:
        if type(raw) is not bytes:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected bin, got {_kind(raw)}")
        self._check_size(len(raw), "")
        return raw

    def check(self, value: object) -> bytes:
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        return self.decode(value)


@dataclass(frozen=True)
class ArrayOf(Kind):
    """``array<item>`` of ``lo..hi`` items; Python value: a tuple (empty when absent)."""

    item: Kind
    hi: int
    high: ErrorCode = ErrorCode.LIMIT_EXCEEDED
    absent: Any = ()
    lo: int = 0
    low: ErrorCode = ErrorCode.INVALID_FIELD

    def decode(self, raw: object) -> tuple:
        if type(raw) is not list:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected an array, got {_kind(raw)}")
        return self._items(raw, self.item.decode)

    def check(self, value: object) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a sequence, got {_kind(value)}")
        return self._items(value, self.item.check)

    def _items(self, items: list | tuple, convert: Callable[[object], Any]) -> tuple:
        if len(items) > self.hi:
            raise Violation(self.high, f"{len(items)} items > maximum {self.hi}")
        if len(items) < self.lo:
            raise Violation(self.low, f"{len(items)} items < minimum {self.lo}")
        out = []
        for index, item in enumerate(items):
            try:
                out.append(convert(item))
            except Violation as exc:
                raise Violation(exc.code, f"[{index}]: {exc.message}") from None
        return tuple(out)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return [self.item.encode(item, codec) for item in value]


@dataclass(frozen=True)
class Nested(Kind):
    """A nested map with its own field table (a ``Hop``, a DHT contact): ``cls`` is a ``WireStruct``."""

    cls: type

    def decode(self, raw: object) -> Any:
        if not isinstance(raw, dict):
            raise Violation(self.cls.ERROR_CODE or ErrorCode.INVALID_FIELD, f"expected a map, got {_kind(raw)}")
        return self.cls._decode_body(raw)

    def check(self, value: object) -> Any:
        if not isinstance(value, self.cls):  # it validated itself when constructed
            raise Violation(ErrorCode.INVALID_FIELD, f"expected {self.cls.__name__}, got {_kind(value)}")
        return value

    def encode(self, value: Any, codec: Codec | None) -> object:
        return value._encode_body(codec)


@dataclass(frozen=True)
class WireField:
    """One row of a message's field table: msgpack key, attribute name, kind."""

    key: int
    name: str
    kind: Kind
    optional: bool


_NO_DEFAULT: Any = dataclasses.MISSING


def wire(key: int, kind: Kind, *, optional: bool = False, default: Any = _NO_DEFAULT) -> Any:
    """Declare a dataclass attribute as body key ``key`` (spec/messages.md, the body tables).

    An ``optional`` field may be absent on the wire (its Python default is the kind's ``absent``);
    a required one with a ``default`` is always written but need not be passed to the constructor
    (a DHT request's ``sender_addrs``, an empty array when the sender has no address)."""
    metadata = {"wire": (key, kind, optional)}
    if optional:
        return dataclasses.field(default=kind.absent, metadata=metadata)
    if default is not _NO_DEFAULT:
        return dataclasses.field(default=default, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def _kind(value: object) -> str:
    return type(value).__name__


class WireStruct:
    """Base of every map with a field table: messages and ``Hop``.

    Subclasses are ``@dataclass(frozen=True, eq=False)``; equality compares tensors
    by dtype, shape and exact values.
    """

    _wire_fields: ClassVar[tuple[WireField, ...] | None] = None
    #: When set, every broken field rule of this map (absent, type, range, nested) reports this
    #: code instead of its own (a DHT record: RECORD_INVALID, spec/dht.md §4 rule 4.1; the
    #: handshake payload: BAD_IDENTITY, spec/transport.md §2.5 step 1). Cross-field rules keep theirs.
    ERROR_CODE: ClassVar[ErrorCode | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The table is collected lazily: dataclass fields exist only after @dataclass runs.
        cls._wire_fields = None

    @classmethod
    def _table(cls) -> tuple[WireField, ...]:
        """The body table (spec/messages.md §4-§7), in ascending key order."""
        if cls._wire_fields is None:
            rows = [
                WireField(f.metadata["wire"][0], f.name, f.metadata["wire"][1], f.metadata["wire"][2])
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if "wire" in f.metadata
            ]
            cls._wire_fields = tuple(sorted(rows, key=lambda row: row.key))
        return cls._wire_fields

    def __post_init__(self) -> None:
        try:
            for row in self._table():
                value = getattr(self, row.name)
                if row.optional and _is_absent(value):
                    object.__setattr__(self, row.name, row.kind.absent)
                    continue
                if value is None:
                    raise Violation(ErrorCode.INVALID_FIELD, f"{row.name}: required")
                try:
                    object.__setattr__(self, row.name, row.kind.check(value))
                except Violation as exc:
                    raise Violation(exc.code, f"{row.name}: {exc.message}") from None
            self._check_rules()
        except Violation as exc:
            raise LocalProtocolError(exc.code, f"{type(self).__name__}.{exc.message}") from None

    def _check_rules(self) -> None:
        """Cross-field rules of the spec, raising ``Violation``; none by default."""

    @classmethod
    def _decode_body(cls, body: dict[int, object]) -> Any:
        """Build an instance from a body map (spec/messages.md §2.5 steps 7-8)."""
        values: dict[str, Any] = {}
        for row in cls._table():
            raw = body.get(row.key)
            if raw is None:  # absent, or nil (accepted as absent, §2.3)
                if not row.optional:
                    raise Violation(cls.ERROR_CODE or ErrorCode.INVALID_FIELD,
                                    f"{row.name} (key {row.key}): required field absent")
                values[row.name] = row.kind.absent
                continue
            try:
                values[row.name] = row.kind.decode(raw)
            except Violation as exc:
                raise Violation(cls.ERROR_CODE or exc.code, f"{row.name} (key {row.key}): {exc.message}") from None
        # Fields are already checked: skip __post_init__ and its second pass over tensors.
        instance = object.__new__(cls)
        for name, value in values.items():
            object.__setattr__(instance, name, value)
        instance._check_rules()
        return instance

    def _encode_body(self, codec: Codec | None) -> dict[int, object]:
        """The canonical body map: ascending keys, absent optional fields omitted (§2.3)."""
        body: dict[int, object] = {}
        for row in self._table():
            value = getattr(self, row.name)
            if row.optional and _is_absent(value):
                continue
            body[row.key] = row.kind.encode(value, codec)
        return body

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, row.name), getattr(other, row.name)) for row in self._table())

    __hash__ = None  # type: ignore[assignment]  # tensors make messages unhashable


def _is_absent(value: object) -> bool:
    """An omitted optional field: ``None``, or an empty sequence for arrays (§2.3 rule 5)."""
    return value is None or (isinstance(value, (tuple, list)) and len(value) == 0)


def _same(a: object, b: object) -> bool:
    torch = sys.modules.get("torch")  # no tensor exists unless torch is loaded; this module never loads it
    if torch is not None and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b
