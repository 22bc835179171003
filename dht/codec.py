"""The DHT's msgpack reader and writer: one value, with the limits of spec/dht.md §3 checked first.

Shared by the message codec (dht/messages.py) and the record codec (dht/records.py), so that one
place owns the msgpack limits and the mapping of msgpack's exceptions to protocol errors.
"""

from __future__ import annotations

from typing import Any

import msgpack

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

from . import params

__all__ = ["pack", "unpack"]


def unpack(data: bytes) -> Any:
    """One msgpack value with the limits of spec/dht.md §3 checked before allocation."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "DHT message must be bytes")
    if len(data) > params.MAX_MESSAGE_BYTES:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"DHT message of {len(data)} bytes exceeds the limit")
    n = len(data)
    try:
        return msgpack.unpackb(
            bytes(data),
            raw=False,
            strict_map_key=False,
            use_list=True,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=min(n, 4096),
            max_map_len=min(n, 64),
            max_ext_len=0,
        )
    except RecursionError:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "msgpack nesting too deep") from None
    except Exception as e:  # msgpack raises ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError...
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"not a single valid msgpack value: {type(e).__name__}") from None


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)
