"""The one bounded msgpack reader: every wire message and record of BioPetals is read here.

A reader is given its limits (``ReadLimits``: bytes, objects, nesting depth, entries of a
container or bytes of a str), checks the size, then walks the format headers without building
anything (``scan_msgpack``), then lets msgpack build the value with every map keyed by unique
unsigned integers. Each protocol names its limits where its spec does: the node and weights
messages (protocol/envelope.py, spec/messages.md §1.2), announcements (protocol/announcement.py),
provider records (protocol/weights.py), DHT messages and records (dht/params.py, spec/dht.md §2),
the handshake payload (protocol/handshake.py, spec/transport.md §2.5). The values are then read
by declarative field tables (``protocol/fields.py``, ``WireStruct`` in protocol/messages.py).

Raises only ``RemoteProtocolError`` on bad bytes: ``LIMIT_EXCEEDED`` for a bound, ``MALFORMED``
for anything else (spec/messages.md §2.5 steps 1-3). Sans-IO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgpack

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_MESSAGE_DEPTH, MAX_MESSAGE_OBJECTS, MAX_MSGPACK_CONTAINER

__all__ = ["ReadLimits", "read_value", "read_map", "scan_msgpack", "unpack_uint_keyed_map", "is_uint"]


@dataclass(frozen=True)
class ReadLimits:
    """The bounds a reader checks before msgpack allocates anything."""

    max_bytes: int  # the whole encoded value
    max_objects: int = MAX_MESSAGE_OBJECTS  # every key, value and item at any depth
    max_depth: int = MAX_MESSAGE_DEPTH  # nesting of arrays and maps; the top level is depth 1
    max_container: int = MAX_MSGPACK_CONTAINER  # entries of one array or map, bytes of one str
    #: False: no structure scan; msgpack bounds every declared length by the bytes left, and only
    #: the size is a limit (the DHT: its fields carry their own limits, spec/dht.md §3). Nesting
    #: deeper than msgpack's stack is then MALFORMED.
    scan: bool = True


# Payload sizes of fixed-width msgpack formats, by first byte.
_FIXED: Final = {
    0xC0: 0, 0xC2: 0, 0xC3: 0,  # nil, false, true
    0xCA: 4, 0xCB: 8,  # float 32/64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,  # uint 8..64
    0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # int 8..64
}
#: The ext formats (fixext 1-16, ext 8/16/32): no message of this protocol uses them (§2.5 step 2).
_EXT: Final = frozenset((0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))

# Variable-length formats: first byte -> (width of the big-endian length, kind).
_SIZED: Final = {
    0xC4: (1, "bin"), 0xC5: (2, "bin"), 0xC6: (4, "bin"),
    0xD9: (1, "str"), 0xDA: (2, "str"), 0xDB: (4, "str"),
}
_CONTAINERS: Final = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}  # -> (width, children per entry)


def is_uint(value: object) -> bool:
    """True for a msgpack unsigned integer value (``bool`` is an int in Python: excluded)."""
    return type(value) is int and value >= 0


def scan_msgpack(
    data: bytes | bytearray | memoryview,
    *,
    max_objects: int = MAX_MESSAGE_OBJECTS,
    max_depth: int = MAX_MESSAGE_DEPTH,
    max_container: int = MAX_MSGPACK_CONTAINER,
) -> int:
    """Check that ``data`` is exactly one msgpack object within the structural limits.

    Walks the format headers only (str and bin payloads are skipped, not copied),
    so its cost is proportional to the number of objects, which it bounds. Reports the
    first problem in byte order (spec/messages.md §2.5 step 2): truncation, the
    reserved byte 0xc1, any ext format or trailing bytes are ``MALFORMED``; too many
    objects, too deep, or a container or str longer than ``max_container`` is
    ``LIMIT_EXCEEDED``.
    Returns the number of objects.
    """
    view = memoryview(data)
    size = len(view)
    pos = 0
    count = 0
    pending = [1]  # objects still to read at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= size:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"msgpack truncated at byte {pos}")
        count += 1
        if count > max_objects:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"more than MAX_MESSAGE_OBJECTS {max_objects} msgpack objects"
            )
        first = view[pos]
        pos += 1
        if first <= 0x7F or first >= 0xE0:  # positive / negative fixint
            continue
        if first <= 0x8F or 0x90 <= first <= 0x9F or first in _CONTAINERS:
            if first <= 0x8F:
                entries, per_entry = first & 0x0F, 2
            elif first <= 0x9F:
                entries, per_entry = first & 0x0F, 1
            else:
                width, per_entry = _CONTAINERS[first]
                entries, pos = _read_length(view, pos, width)
            if entries > max_container:
                raise RemoteProtocolError(
                    ErrorCode.LIMIT_EXCEEDED, f"container of {entries} entries > MAX_MSGPACK_CONTAINER {max_container}"
                )
            if len(pending) > max_depth:  # this container's depth is len(pending)
                raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"msgpack nested deeper than {max_depth}")
            pending.append(entries * per_entry)
            continue
        if 0xA0 <= first <= 0xBF:  # fixstr
            length, kind = first & 0x1F, "str"
        elif first in _FIXED:
            length, kind = _FIXED[first], "fixed"
        elif first in _SIZED:
            width, kind = _SIZED[first]
            length, pos = _read_length(view, pos, width)
            if kind == "str" and length > max_container:
                raise RemoteProtocolError(
                    ErrorCode.LIMIT_EXCEEDED, f"str of {length} bytes > MAX_MSGPACK_CONTAINER {max_container}"
                )
        elif first in _EXT:
            # Their meaning (timestamps, application types) is library-specific; the
            # protocol never uses them, so no receiver has to interpret one.
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"msgpack ext format 0x{first:02x} at byte {pos - 1}")
        else:  # 0xc1, the one byte msgpack never uses
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"reserved msgpack byte 0x{first:02x} at byte {pos - 1}")
        if length > size - pos:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"msgpack {kind} at byte {pos} runs past the end")
        pos += length
    if pos != size:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{size - pos} trailing bytes after the message")
    return count


def _read_length(view: memoryview, pos: int, width: int) -> tuple[int, int]:
    if width > len(view) - pos:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"msgpack length truncated at byte {pos}")
    return int.from_bytes(view[pos : pos + width], "big"), pos + width


def _pairs_to_dict(pairs: list[tuple[object, object]]) -> dict[int, object]:
    """msgpack ``object_pairs_hook``: every map key is a uint, each at most once (§2.5 step 3)."""
    result: dict[int, object] = {}
    for key, value in pairs:
        if not is_uint(key):
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"map key {key!r:.40} is not an unsigned integer")
        if key in result:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"duplicate map key {key}")
        result[key] = value
    return result


def read_value(data: bytes | bytearray | memoryview, limits: ReadLimits, *, what: str) -> object:
    """Size check, structure scan, then parse of one msgpack value whose maps all have unique
    unsigned-integer keys (spec/messages.md §2.5 steps 1-3). ``what`` names it in errors."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > limits.max_bytes:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what} of {len(data)} bytes > {limits.max_bytes}")
    # The scan bounds everything the parse below allocates; without it, the max_*_len below do.
    if limits.scan:
        scan_msgpack(data, max_objects=limits.max_objects, max_depth=limits.max_depth, max_container=limits.max_container)
    bound = limits.max_container if limits.scan else len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,  # keys are checked by _pairs_to_dict
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=limits.max_bytes,
            max_str_len=bound,
            max_array_len=bound,
            max_map_len=bound,
            max_ext_len=0,  # no wire format of this project uses ext types
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # After the scan only invalid UTF-8 remains (RemoteProtocolError from the key
        # hook is not caught here); without it, anything msgpack refuses is MALFORMED.
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"invalid msgpack: {exc}") from None


def read_map(data: bytes | bytearray | memoryview, limits: ReadLimits, *, what: str) -> dict[int, object]:
    """``read_value`` of a value that must be a map (else ``MALFORMED``)."""
    obj = read_value(data, limits, what=what)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what} must be a map, got {type(obj).__name__}")
    return obj


def unpack_uint_keyed_map(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    max_bytes: int,
    max_objects: int = MAX_MESSAGE_OBJECTS,
    max_depth: int = MAX_MESSAGE_DEPTH,
    max_container: int = MAX_MSGPACK_CONTAINER,
) -> dict[int, object]:
    """``read_map`` with the limits given one by one (announcements, provider records)."""
    return read_map(data, ReadLimits(max_bytes, max_objects, max_depth, max_container), what=what)
