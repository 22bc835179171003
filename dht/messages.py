"""DHT wire codec: every RPC message as a declarative field table, encode and decode.

See spec/dht.md §3 (conventions), §3.1 (contact) and §7 (messages). Each message is a
``WireStruct`` (protocol/table.py) whose fields are declared with ``wire(key, kind)``; bytes are
read by the package's bounded reader with the DHT's limits (dht/codec.py), then checked against
the table in ascending key order. ``decode_request`` and ``decode_response`` either return a
message or raise RemoteProtocolError: never a msgpack, Key, Type, Value or Index error.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Union


from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.table import ArrayOf, Blob, Kind, Nested, Text, UInt, Violation, WireStruct, wire

from . import params
from .codec import pack, unpack
from .ids import ED25519_PEER_ID_PREFIX, ID_BYTES, PEER_ID_BYTES
from .records import Record, record_from_obj, record_to_obj

# Message types (spec/dht.md §7).
PING_REQUEST = 1
PING_RESPONSE = 2
STORE_REQUEST = 3
STORE_RESPONSE = 4
FIND_NODE_REQUEST = 5
FIND_NODE_RESPONSE = 6
FIND_VALUE_REQUEST = 7
FIND_VALUE_RESPONSE = 8
ERROR_RESPONSE = 9

STATUS_OK = 0

_INVALID = ErrorCode.INVALID_FIELD


# --------------------------------------------------------------------------- field kinds


@functools.lru_cache(maxsize=4096)
def _addr_peer_id(addr: str) -> bytes | None:
    """Validate a multiaddr; its /p2p/ id if any. Cached: responses repeat the same contacts
    (a batched FIND_VALUE answer lists the same nodes for many keys), and parsing dominates decoding.
    Invalid addresses raise MultiaddrError (a RemoteProtocolError, INVALID_FIELD) and are not cached."""
    parsed = Multiaddr.parse(addr)
    return None if parsed.peer_id is None else parsed.peer_id.multihash


@dataclass(frozen=True)
class AddrText(Text):
    """A multiaddr in text form (spec/dht.md §3.1), kept as the ``str``: over ``MAX_ADDR_BYTES``
    is ``LIMIT_EXCEEDED``, one that does not parse ``INVALID_FIELD``."""

    def decode(self, raw: object) -> str:
        text = Text.decode(self, raw)
        try:
            _addr_peer_id(text)
        except RemoteProtocolError as exc:
            raise Violation(ErrorCode(exc.code), exc.message) from None
        return text

    check = decode


@dataclass(frozen=True)
class PeerIdBytes(Blob):
    """A binary Ed25519 peer id: exactly ``PEER_ID_BYTES`` bytes starting ``00 24 08 01 12 20``."""

    def decode(self, raw: object) -> bytes:
        value = Blob.decode(self, raw)
        if not value.startswith(ED25519_PEER_ID_PREFIX):
            raise Violation(_INVALID, "not an Ed25519 peer id (prefix 00 24 08 01 12 20)")
        return value

    def check(self, value: object) -> bytes:
        return self.decode(bytes(value) if isinstance(value, (bytearray, memoryview)) else value)


class RecordKind(Kind):
    """A signed record (spec/dht.md §3.2), read by its own table (dht/records.py): its broken rules
    report ``RECORD_INVALID`` or ``RECORD_TOO_LARGE`` (§4 rules 4.1, 4.2)."""

    def decode(self, raw: object) -> Record:
        try:
            return record_from_obj(raw)
        except RemoteProtocolError as exc:
            raise Violation(ErrorCode(exc.code), exc.message) from None

    def check(self, value: object) -> Record:
        if not isinstance(value, Record):
            raise Violation(ErrorCode.RECORD_INVALID, f"expected a Record, got {type(value).__name__}")
        return value

    def encode(self, value: Any, codec: Any) -> object:
        return record_to_obj(value)


ADDRS = ArrayOf(AddrText(0, params.MAX_ADDR_BYTES), params.MAX_ADDRS)
ID = Blob(ID_BYTES, ID_BYTES, high=_INVALID)
RECORD = RecordKind()
U16 = UInt(0, 0xFFFF)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, eq=False)
class Contact(WireStruct):
    """A node: binary peer id (38 bytes) and its listening multiaddrs (spec/dht.md §3.1)."""

    peer_id: bytes = wire(0, PeerIdBytes(PEER_ID_BYTES, PEER_ID_BYTES, high=_INVALID))
    addrs: tuple[str, ...] = wire(1, ADDRS, default=())

    def _check_rules(self) -> None:
        for addr in self.addrs:
            named = _addr_peer_id(addr)
            if named is not None and named != self.peer_id:
                raise Violation(_INVALID, f"addrs: {addr[:80]!r} names another peer than the contact (/p2p/)")

    def __hash__(self) -> int:  # contacts key routing-table entries by value
        return hash((self.peer_id, self.addrs))


CONTACTS = ArrayOf(Nested(Contact), params.MAX_CONTACTS)


class DHTMessage(WireStruct):
    """Base of the nine messages of spec/dht.md §7; ``TYPE`` is key 0."""

    TYPE: ClassVar[int]


@dataclass(frozen=True, eq=False)
class PingRequest(DHTMessage):
    TYPE: ClassVar[int] = PING_REQUEST
    sender_addrs: tuple[str, ...] = wire(1, ADDRS, default=())


@dataclass(frozen=True, eq=False)
class PingResponse(DHTMessage):
    TYPE: ClassVar[int] = PING_RESPONSE


@dataclass(frozen=True, eq=False)
class StoreRequest(DHTMessage):
    TYPE: ClassVar[int] = STORE_REQUEST
    records: tuple[Record, ...] = wire(2, ArrayOf(RECORD, params.MAX_RECORDS_PER_STORE, lo=1))
    sender_addrs: tuple[str, ...] = wire(1, ADDRS, default=())


@dataclass(frozen=True, eq=False)
class StoreResponse(DHTMessage):
    TYPE: ClassVar[int] = STORE_RESPONSE
    statuses: tuple[int, ...] = wire(1, ArrayOf(U16, params.MAX_RECORDS_PER_STORE, lo=1))  # 0 (OK) or a code


@dataclass(frozen=True, eq=False)
class FindNodeRequest(DHTMessage):
    TYPE: ClassVar[int] = FIND_NODE_REQUEST
    target: bytes = wire(2, ID)
    sender_addrs: tuple[str, ...] = wire(1, ADDRS, default=())


@dataclass(frozen=True, eq=False)
class FindNodeResponse(DHTMessage):
    TYPE: ClassVar[int] = FIND_NODE_RESPONSE
    contacts: tuple[Contact, ...] = wire(1, CONTACTS)


@dataclass(frozen=True, eq=False)
class FindValueRequest(DHTMessage):
    TYPE: ClassVar[int] = FIND_VALUE_REQUEST
    keys: tuple[bytes, ...] = wire(2, ArrayOf(ID, params.MAX_KEYS_PER_FIND, lo=1))  # key ids, 32 bytes each
    sender_addrs: tuple[str, ...] = wire(1, ADDRS, default=())


@dataclass(frozen=True, eq=False)
class KeyResult(WireStruct):
    """One requested key's answer in a FIND_VALUE response (a nested map, not a message)."""

    records: tuple[Record, ...] = wire(0, ArrayOf(RECORD, params.MAX_SUBKEYS_PER_KEY))
    contacts: tuple[Contact, ...] = wire(1, CONTACTS)


@dataclass(frozen=True, eq=False)
class FindValueResponse(DHTMessage):
    TYPE: ClassVar[int] = FIND_VALUE_RESPONSE
    results: tuple[KeyResult, ...] = wire(1, ArrayOf(Nested(KeyResult), params.MAX_KEYS_PER_FIND, lo=1))


@dataclass(frozen=True, eq=False)
class ErrorResponse(DHTMessage):
    TYPE: ClassVar[int] = ERROR_RESPONSE
    code: int = wire(1, U16)
    message: str = wire(2, Text(0, params.MAX_ERROR_MESSAGE_BYTES, high=_INVALID))


Request = Union[PingRequest, StoreRequest, FindNodeRequest, FindValueRequest]
Response = Union[PingResponse, StoreResponse, FindNodeResponse, FindValueResponse, ErrorResponse]

REQUESTS: dict[int, type[DHTMessage]] = {cls.TYPE: cls for cls in (PingRequest, StoreRequest, FindNodeRequest, FindValueRequest)}
RESPONSES: dict[int, type[DHTMessage]] = {
    cls.TYPE: cls for cls in (PingResponse, StoreResponse, FindNodeResponse, FindValueResponse, ErrorResponse)
}


def contact_from_obj(obj: Any) -> Contact:
    return _decoded(Nested(Contact), obj, "contact")


def contact_to_obj(c: Contact) -> dict:
    return c._encode_body(None)


# --------------------------------------------------------------------------- encode, decode


def encode(message: Request | Response) -> bytes:
    """Canonical bytes of any DHT message (ascending integer keys, spec/dht.md §3)."""
    if not isinstance(message, DHTMessage):
        raise TypeError(f"not a DHT message: {type(message).__name__}")
    return pack({0: message.TYPE, **message._encode_body(None)})


def decode_request(data: bytes) -> Request:
    """A request from bytes; RemoteProtocolError (UNKNOWN_MESSAGE for a non-request type)."""
    return _decode(data, REQUESTS, "request")  # type: ignore[return-value]


def decode_response(data: bytes) -> Response:
    """A response from bytes; RemoteProtocolError (UNKNOWN_MESSAGE for a non-response type)."""
    return _decode(data, RESPONSES, "response")  # type: ignore[return-value]


def _decode(data: bytes, known: dict[int, type[DHTMessage]], what: str) -> DHTMessage:
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "DHT message must be a map")
    mtype = obj.get(0)
    if type(mtype) is not int:
        raise RemoteProtocolError(_INVALID, "message type (key 0) missing or not an integer")
    cls = known.get(mtype)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"message type {mtype} is not a DHT {what}")
    return _decoded(Nested(cls), obj, cls.__name__)


def _decoded(kind: Nested, obj: Any, what: str) -> Any:
    try:
        return kind.decode(obj)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, f"{what}.{exc.message}") from None
