"""The value of a node's DHT block announcement: a frozen dataclass and its codec.

See spec/announcement.md. A node stores one signed DHT record per block it serves
(key ``"<model>.<block>"``, subkey its peer id, spec/dht.md §6); the record's value
is ``encode_announcement(Announcement(...))``. Clients read it with
``decode_announcement``, which follows the decoding order of spec/announcement.md §3
and raises only ``RemoteProtocolError``.

The body reuses the field kinds of the node protocol (``biopetals.protocol.fields``):
same msgpack conventions, same canonical encoding (spec/messages.md §1.1, §2.3).
Sans-IO: bytes in, values out.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import msgpack

from biopetals.protocol.envelope import is_uint, unpack_uint_keyed_map
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_ADAPTERS, MAX_BLOCKS, MAX_LABEL_BYTES, MAX_MULTIADDR_BYTES
from biopetals.protocol.table import U64_MAX, ArrayOf, Float, Text, UInt, Violation, WireStruct, wire

__all__ = [
    "ANNOUNCEMENT_FORMAT",
    "MAX_ANNOUNCEMENT_BYTES",
    "MAX_ANNOUNCED_ADDRS",
    "State",
    "Announcement",
    "encode_announcement",
    "decode_announcement",
]

#: Format version of the value (spec/announcement.md §2, key 0).
ANNOUNCEMENT_FORMAT: Final = 1
#: Largest encoded value: the DHT's ``MAX_VALUE_BYTES`` (spec/dht.md §2).
MAX_ANNOUNCEMENT_BYTES: Final = 1024
#: Most multiaddrs in one announcement (spec/dht.md ``MAX_ADDRS``).
MAX_ANNOUNCED_ADDRS: Final = 8
#: Structural bounds for the scan (spec/announcement.md §3 step 2): a valid value
#: has at most 1 + 2 * 12 + 8 + 8 objects and depth 2; the longest str is a multiaddr.
_MAX_OBJECTS: Final = 128
_MAX_DEPTH: Final = 2
_MAX_CONTAINER: Final = MAX_MULTIADDR_BYTES

_KEY_FORMAT: Final = 0


class State(enum.IntEnum):
    """A node's state for one block (spec/announcement.md §2.1)."""

    JOINING = 0  # loading or benchmarking; do not route to it yet
    ONLINE = 1  # serving
    OFFLINE = 2  # shutting down or stopped; the record expires soon


@dataclass(frozen=True)
class _StateKind(UInt):
    """``uint`` state code, a ``State`` in Python."""

    def decode(self, raw: object) -> State:
        return State(super().decode(raw))

    def check(self, value: object) -> State:
        return State(super().check(int(value) if isinstance(value, State) else value))

    def encode(self, value: Any, codec: Any) -> object:
        return int(value)


_LABEL: Final = Text(1, MAX_LABEL_BYTES)


@dataclass(frozen=True, eq=False)
class Announcement(WireStruct):
    """What a node announces for each block it serves (spec/announcement.md §2).

    Constructing one validates every field and raises ``LocalProtocolError``.
    """

    FORMAT: ClassVar[int] = ANNOUNCEMENT_FORMAT
    state: State = wire(1, _StateKind(0, len(State) - 1))
    start: int = wire(2, UInt(0, MAX_BLOCKS - 1))
    end: int = wire(3, UInt(1, MAX_BLOCKS))
    inference_tps: float = wire(4, Float())
    forward_tps: float = wire(5, Float())
    cache_tokens_left: int = wire(6, UInt(0, U64_MAX))
    dtype: str = wire(7, _LABEL)
    quant: str = wire(8, _LABEL)
    version: str = wire(9, _LABEL)
    addrs: tuple[str, ...] = wire(10, ArrayOf(Text(1, MAX_MULTIADDR_BYTES), MAX_ANNOUNCED_ADDRS), optional=True)
    adapters: tuple[str, ...] = wire(11, ArrayOf(_LABEL, MAX_ADAPTERS), optional=True)  # server-side adapters

    def _check_rules(self) -> None:
        if self.start >= self.end:
            raise Violation(ErrorCode.INVALID_FIELD, f"start {self.start} must be < end {self.end}")

    def serves(self, block: int) -> bool:
        """True when block ``block`` lies in the announced span ``[start, end)``."""
        return self.start <= block < self.end


def encode_announcement(announcement: Announcement) -> bytes:
    """Canonical bytes of ``announcement`` (spec/announcement.md §2, spec/messages.md §2.3)."""
    if not isinstance(announcement, Announcement):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"not an Announcement: {type(announcement).__name__}")
    body: dict[int, object] = {_KEY_FORMAT: ANNOUNCEMENT_FORMAT}
    body.update(announcement._encode_body(None))
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > MAX_ANNOUNCEMENT_BYTES:
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"announcement of {len(data)} bytes > {MAX_ANNOUNCEMENT_BYTES}: announce fewer or shorter multiaddrs",
        )
    return data


def decode_announcement(data: bytes | bytearray | memoryview) -> Announcement:
    """Parse a DHT record value (spec/announcement.md §3). Raises only ``RemoteProtocolError``."""
    obj = unpack_uint_keyed_map(
        data,
        what="announcement",
        max_bytes=MAX_ANNOUNCEMENT_BYTES,
        max_objects=_MAX_OBJECTS,
        max_depth=_MAX_DEPTH,
        max_container=_MAX_CONTAINER,
    )
    fmt = obj.get(_KEY_FORMAT)
    if not is_uint(fmt):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "key 0 (format) absent or not an unsigned integer")
    if fmt != ANNOUNCEMENT_FORMAT:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION, f"announcement format {fmt}; this side reads {ANNOUNCEMENT_FORMAT}"
        )
    try:
        return Announcement._decode_body(obj)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, f"Announcement.{exc.message}") from None
