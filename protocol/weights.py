"""The weights protocol (``/biopetals/weights/1``) and the weights-provider DHT record.

See spec/weights.md §3-§4. A peer asks another for a model's manifest (``GetManifest``
→ ``ManifestData``) and for one chunk of one part (``GetChunk`` → ``ChunkData``); any
request may be answered by the node protocol's ``Error`` (type 15, same body). Each
request is one unary call: one message each way. Messages use the node protocol's
envelope and field kinds (spec/messages.md §2), so the same decoding order applies.

A peer that can serve chunks stores a ``ProviderRecord`` under the DHT key
``"<swarm name>.weights"`` (subkey: its peer id): the manifest hash, the parts it holds
(as ranges of part indices), and its addresses.

Sans-IO: bytes in, values out; decoders raise only ``RemoteProtocolError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

import msgpack

from biopetals.protocol.envelope import is_uint, pack_envelope, unpack_uint_keyed_map
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_BLOCKS, MAX_MULTIADDR_BYTES, MAX_NAME_BYTES
from biopetals.protocol.manifest import MAX_CHUNK_SIZE, MAX_CHUNKS_PER_PART, MAX_MANIFEST_BYTES
from biopetals.protocol.messages import Error, Message, decode_from_table
from biopetals.protocol.table import ArrayOf, Blob, Text, UInt, Violation, WireStruct, wire

__all__ = [
    "WEIGHTS_PROTOCOL",
    "GetManifest",
    "ManifestData",
    "GetChunk",
    "ChunkData",
    "Error",
    "WEIGHTS_MESSAGES",
    "REQUESTS",
    "encode_weights_message",
    "decode_weights_message",
    "ProviderRecord",
    "PROVIDER_FORMAT",
    "MAX_PROVIDER_RANGES",
    "provider_key",
    "encode_provider",
    "decode_provider",
    "part_ranges",
]

WEIGHTS_PROTOCOL: Final = "/biopetals/weights/1"
#: Largest part index: the blocks, then ``client`` and ``files`` (spec/weights.md §2.2).
MAX_PART: Final = MAX_BLOCKS + 1
#: Largest chunk index (spec/weights.md §2: a part has at most MAX_CHUNKS_PER_PART chunks).
MAX_CHUNK_INDEX: Final = MAX_CHUNKS_PER_PART - 1

_HASH: Final = Blob(32, 32, high=ErrorCode.INVALID_FIELD)


@dataclass(frozen=True, eq=False)
class GetManifest(Message):
    """Ask for the manifest of a model by its swarm name (spec/weights.md §3.2)."""

    TYPE: ClassVar[int] = 1
    model: str = wire(0, Text(1, MAX_NAME_BYTES))


@dataclass(frozen=True, eq=False)
class ManifestData(Message):
    """The manifest's exact bytes; the asker checks them against the name's hash digits."""

    TYPE: ClassVar[int] = 2
    manifest: bytes = wire(0, Blob(1, MAX_MANIFEST_BYTES))


@dataclass(frozen=True, eq=False)
class GetChunk(Message):
    """Ask for chunk ``index`` of part ``part`` of the manifest with hash ``manifest_hash``."""

    TYPE: ClassVar[int] = 3
    manifest_hash: bytes = wire(0, _HASH)
    part: int = wire(1, UInt(0, MAX_PART))
    index: int = wire(2, UInt(0, MAX_CHUNK_INDEX))


@dataclass(frozen=True, eq=False)
class ChunkData(Message):
    """One chunk's bytes; the asker checks their SHA-256 against the manifest before use."""

    TYPE: ClassVar[int] = 4
    part: int = wire(0, UInt(0, MAX_PART))
    index: int = wire(1, UInt(0, MAX_CHUNK_INDEX))
    data: bytes = wire(2, Blob(1, MAX_CHUNK_SIZE))


#: The envelope version of /biopetals/weights/1 (spec/weights.md §3.1); the node protocol's moved on to 2.
WEIGHTS_VERSION: Final = 1

WEIGHTS_MESSAGES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls for cls in (GetManifest, ManifestData, GetChunk, ChunkData, Error)
}
#: What a requester may send (spec/weights.md §3.1); replies are ``ManifestData``/``ChunkData`` or ``Error``.
REQUESTS: Final = (GetManifest, GetChunk)


def encode_weights_message(message: Message) -> bytes:
    """Canonical bytes of a weights-protocol message (one frame payload)."""
    if type(message) not in WEIGHTS_MESSAGES.values():
        raise LocalProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"not a weights message: {type(message).__name__}")
    return pack_envelope(message.TYPE, message._encode_body(None), WEIGHTS_VERSION)


def decode_weights_message(data: bytes | bytearray | memoryview,
                           expected: Iterable[type[Message]] | None = None) -> Message:
    """Decode one frame payload; ``expected`` limits the acceptable types (``UNKNOWN_MESSAGE`` else)."""
    return decode_from_table(data, WEIGHTS_MESSAGES if expected is None else {cls.TYPE: cls for cls in expected},
                             WEIGHTS_VERSION)


# ----------------------------------------------------------------------------- provider record

PROVIDER_FORMAT: Final = 1
#: Most part ranges one record lists (a peer holding every other block needs many).
MAX_PROVIDER_RANGES: Final = 32
_MAX_PROVIDER_ADDRS: Final = 8
#: The DHT's largest value (spec/dht.md §2).
_MAX_PROVIDER_BYTES: Final = 1024


def provider_key(model: str) -> str:
    """The DHT key under which weights providers of ``model`` store their records."""
    return f"{model}.weights"


@dataclass(frozen=True, eq=False)
class ProviderRecord(WireStruct):
    """A DHT record value: "I serve these parts of the manifest with this hash" (spec/weights.md §4)."""

    FORMAT: ClassVar[int] = PROVIDER_FORMAT
    manifest_hash: bytes = wire(1, _HASH)
    # Flat [start0, end0, start1, end1, ...]: part ranges, each end exclusive.
    ranges: tuple[int, ...] = wire(2, ArrayOf(UInt(0, MAX_PART + 1), 2 * MAX_PROVIDER_RANGES))
    addrs: tuple[str, ...] = wire(3, ArrayOf(Text(1, MAX_MULTIADDR_BYTES), _MAX_PROVIDER_ADDRS), optional=True)

    def _check_rules(self) -> None:
        if not self.ranges or len(self.ranges) % 2:
            raise Violation(ErrorCode.INVALID_FIELD, "ranges: need a non-empty, even number of part indices")
        previous_end = -1  # ranges ascend and neither overlap nor touch: one canonical form per set
        for start, end in zip(self.ranges[::2], self.ranges[1::2]):
            if start >= end or start <= previous_end:
                raise Violation(ErrorCode.INVALID_FIELD, "ranges: need ascending, disjoint, non-touching [start, end)")
            previous_end = end

    def holds(self, part: int) -> bool:
        return any(start <= part < end for start, end in zip(self.ranges[::2], self.ranges[1::2]))

    def parts(self) -> list[int]:
        return [p for start, end in zip(self.ranges[::2], self.ranges[1::2]) for p in range(start, end)]


def part_ranges(parts: Iterable[int]) -> tuple[int, ...]:
    """Sorted part indices as the flat range list of ``ProviderRecord.ranges``."""
    out: list[int] = []
    for part in sorted(set(parts)):
        if out and out[-1] == part:
            out[-1] = part + 1
        else:
            out += [part, part + 1]
    return tuple(out)


def encode_provider(record: ProviderRecord) -> bytes:
    if not isinstance(record, ProviderRecord):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"not a ProviderRecord: {type(record).__name__}")
    body: dict[int, object] = {0: PROVIDER_FORMAT}
    body.update(record._encode_body(None))
    data = msgpack.packb(body, use_bin_type=True)
    if len(data) > _MAX_PROVIDER_BYTES:
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"provider record of {len(data)} bytes > {_MAX_PROVIDER_BYTES}")
    return data


def decode_provider(data: bytes | bytearray | memoryview) -> ProviderRecord:
    """Parse a provider record value. Raises only ``RemoteProtocolError``."""
    obj = unpack_uint_keyed_map(data, what="provider record", max_bytes=_MAX_PROVIDER_BYTES,
                                max_objects=128, max_depth=2, max_container=MAX_MULTIADDR_BYTES)
    fmt = obj.get(0)
    if not is_uint(fmt):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "key 0 (format) absent or not an unsigned integer")
    if fmt != PROVIDER_FORMAT:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"provider format {fmt}; this side reads {PROVIDER_FORMAT}")
    try:
        return ProviderRecord._decode_body(obj)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, f"ProviderRecord.{exc.message}") from None
