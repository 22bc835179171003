"""The node protocol's envelope: frame payload bytes to and from ``(type, body)``.

See spec/messages.md §2. ``unpack_envelope`` runs steps 1-6 of the decoding order
(§2.5): a structure scan that bounds every allocation before msgpack builds a single
object, the msgpack parse itself, then the envelope keys. ``pack_envelope`` writes
the canonical encoding of §2.3. Message bodies are the business of
``biopetals.protocol.messages``.

Sans-IO: bytes in, values out; no sockets, no clock.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Final

import msgpack

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_MESSAGE_DEPTH,
    MAX_MESSAGE_OBJECTS,
    MAX_MSGPACK_CONTAINER,
)

__all__ = [
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "KEY_VERSION",
    "KEY_TYPE",
    "KEY_BODY",
    "scan_msgpack",
    "unpack_envelope",
    "pack_envelope",
    "is_uint",
]

#: The transport protocol name these messages travel on (spec/messages.md, header). Version 2:
#: sessions bound to their chain (§5.10), a change a version-1 peer would misread (spec/README.md §3).
PROTOCOL_NAME: Final = "/biopetals/node/2"
#: The envelope ``version`` of this protocol (spec/messages.md §2.2): the major version of its name.
PROTOCOL_VERSION: Final = 2

KEY_VERSION: Final = 0
KEY_TYPE: Final = 1
KEY_BODY: Final = 2

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


def unpack_uint_keyed_map(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    max_bytes: int,
    max_objects: int = MAX_MESSAGE_OBJECTS,
    max_depth: int = MAX_MESSAGE_DEPTH,
    max_container: int = MAX_MSGPACK_CONTAINER,
) -> dict[int, object]:
    """Size check, structure scan, then parse of a msgpack map whose maps all have unique
    unsigned-integer keys (spec/messages.md §2.5 steps 1-3; spec/announcement.md reuses them).

    ``what`` names the object in error messages. Raises only ``RemoteProtocolError`` on bad bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what} of {len(data)} bytes > {max_bytes}")
    # The scan bounds everything the parse below allocates.
    scan_msgpack(data, max_objects=max_objects, max_depth=max_depth, max_container=max_container)
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,  # keys are checked by _pairs_to_dict
            object_pairs_hook=_pairs_to_dict,
            max_bin_len=max_bytes,
            max_str_len=max_container,
            max_array_len=max_container,
            max_map_len=max_container,
            max_ext_len=max_container,
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        # After the scan only invalid UTF-8 remains (RemoteProtocolError from the key
        # hook is not caught here).
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"invalid msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"{what} must be a map, got {type(obj).__name__}")
    return obj


def unpack_envelope(
    data: bytes | bytearray | memoryview, known_types: Container[int], version: int = PROTOCOL_VERSION
) -> tuple[int, dict[int, object]]:
    """Parse a frame payload into ``(type, body)`` (spec/messages.md §2.5 steps 1-6).

    ``known_types`` are the type codes the caller accepts here; any other is
    ``UNKNOWN_MESSAGE``. ``version``: the envelope version of the caller's protocol
    (the node protocol's by default; the weights protocol has its own, spec/weights.md §3.1).
    Raises only ``RemoteProtocolError`` on bad bytes.
    """
    # Steps 1-3, then 4-6.
    obj = unpack_uint_keyed_map(data, what="message", max_bytes=MAX_FRAME_BYTES)
    got = obj.get(KEY_VERSION)
    if not is_uint(got):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "envelope key 0 (version) absent or not an unsigned integer")
    if got != version:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"message version {got}; this side speaks {version}")
    type_code = obj.get(KEY_TYPE)
    if not is_uint(type_code):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "envelope key 1 (type) absent or not an unsigned integer")
    if type_code not in known_types:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"message type {type_code} not expected here")
    body = obj.get(KEY_BODY)
    if not isinstance(body, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "envelope key 2 (body) absent or not a map")
    return type_code, body


def pack_envelope(type_code: int, body: dict[int, object], version: int = PROTOCOL_VERSION) -> bytes:
    """Canonical bytes of an envelope (spec/messages.md §2.3), with envelope ``version``.

    ``body`` (and every map inside it) must already have its keys in ascending order:
    msgpack writes dicts in insertion order, and picks the shortest int, str, bin,
    array and map formats itself; Python floats are written as float 64.
    """
    data = msgpack.packb(
        {KEY_VERSION: version, KEY_TYPE: type_code, KEY_BODY: body}, use_bin_type=True
    )
    if len(data) > MAX_FRAME_BYTES:
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"message of {len(data)} bytes > MAX_FRAME_BYTES")
    return data
