"""The DHT's msgpack reading and writing: the package's one bounded reader (protocol/reader.py)
with the DHT's limits (spec/dht.md §2, §3), shared by the message and record codecs.
"""

from __future__ import annotations

from typing import Any

import msgpack

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.reader import read_value

from . import params

__all__ = ["pack", "unpack"]


def unpack(data: bytes) -> Any:
    """One msgpack value, read by the package's bounded reader with the DHT's limits (spec/dht.md §2, §3)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "DHT message must be bytes")
    return read_value(data, params.READ_LIMITS, what="DHT message")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)
