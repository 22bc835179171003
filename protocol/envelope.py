"""The node protocol's envelope: frame payload bytes to and from ``(type, body)``.

See spec/messages.md §2. ``unpack_envelope`` runs steps 1-6 of the decoding order
(§2.5): the one bounded msgpack reader of this package (protocol/reader.py) with the limits
of messages.md §1.2, then the envelope keys. ``pack_envelope`` writes
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
from biopetals.protocol.reader import ReadLimits, is_uint, read_map, scan_msgpack, unpack_uint_keyed_map

__all__ = [
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "KEY_VERSION",
    "KEY_TYPE",
    "KEY_BODY",
    "MESSAGE_LIMITS",
    "scan_msgpack",
    "unpack_uint_keyed_map",
    "unpack_envelope",
    "pack_envelope",
    "is_uint",
]

#: The transport protocol name these messages travel on (spec/messages.md, header). Version 2:
#: sessions bound to their chain (§5.10), a change a version-1 peer would misread (spec/README.md §3).
PROTOCOL_NAME: Final = "/biopetals/node/2"
#: The envelope ``version`` of this protocol (spec/messages.md §2.2): the major version of its name.
PROTOCOL_VERSION: Final = 2

#: The bounds of every node-protocol (and weights-protocol) message (spec/messages.md §1.2, §2.5).
MESSAGE_LIMITS: Final = ReadLimits(
    max_bytes=MAX_FRAME_BYTES, max_objects=MAX_MESSAGE_OBJECTS, max_depth=MAX_MESSAGE_DEPTH,
    max_container=MAX_MSGPACK_CONTAINER,
)

KEY_VERSION: Final = 0
KEY_TYPE: Final = 1
KEY_BODY: Final = 2

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
    obj = read_map(data, MESSAGE_LIMITS, what="message")
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
