"""DHT wire codec: typed frozen dataclasses for every RPC message, encode and decode.

See spec/dht.md §3 (conventions) and §7 (messages). ``decode_request`` and
``decode_response`` either return a message or raise RemoteProtocolError: never a
msgpack, Key, Type, Value or Index error. The size check comes before parsing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Union

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.multiaddr import Multiaddr

from . import params
from .ids import ID_BYTES, PEER_ID_BYTES, ED25519_PEER_ID_PREFIX
from .codec import pack, unpack
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


@dataclass(frozen=True, slots=True)
class Contact:
    """A node: binary peer id (38 bytes) and its listening multiaddrs (spec/dht.md §3.1)."""

    peer_id: bytes
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PingRequest:
    sender_addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PingResponse:
    pass


@dataclass(frozen=True, slots=True)
class StoreRequest:
    records: tuple[Record, ...]
    sender_addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoreResponse:
    statuses: tuple[int, ...]  # 0 (OK) or an ErrorCode per record


@dataclass(frozen=True, slots=True)
class FindNodeRequest:
    target: bytes
    sender_addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FindNodeResponse:
    contacts: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class FindValueRequest:
    keys: tuple[bytes, ...]  # key ids, 32 bytes each
    sender_addrs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyResult:
    records: tuple[Record, ...]
    contacts: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class FindValueResponse:
    results: tuple[KeyResult, ...]


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    code: int
    message: str


Request = Union[PingRequest, StoreRequest, FindNodeRequest, FindValueRequest]
Response = Union[PingResponse, StoreResponse, FindNodeResponse, FindValueResponse, ErrorResponse]


# --------------------------------------------------------------------------- helpers


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_FIELD, message)


def _top(data: bytes) -> tuple[int, dict]:
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "DHT message must be a map")
    if not all(type(k) is int for k in obj):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "DHT message map keys must be integers")
    mtype = obj.get(0)
    if type(mtype) is not int:
        raise _invalid("message type (key 0) missing or not an integer")
    return mtype, obj


def _array(obj: dict, key: int, what: str, lo: int, hi: int) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise _invalid(f"{what} (key {key}) missing or not an array")
    if not lo <= len(value) <= hi:
        if len(value) > hi:
            raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what}: {len(value)} entries > {hi}")
        raise _invalid(f"{what}: {len(value)} entries < {lo}")
    return value


@functools.lru_cache(maxsize=4096)
def _addr_peer_id(addr: str) -> bytes | None:
    """Validate a multiaddr; its /p2p/ id if any. Cached: responses repeat the same contacts
    (a batched FIND_VALUE answer lists the same nodes for many keys), and parsing dominates decoding.
    Invalid addresses raise MultiaddrError (a RemoteProtocolError, INVALID_FIELD) and are not cached."""
    parsed = Multiaddr.parse(addr)
    return None if parsed.peer_id is None else parsed.peer_id.multihash


def _addrs(value: Any, what: str, peer_id: bytes | None = None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{what} must be an array")
    if len(value) > params.MAX_ADDRS:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what}: {len(value)} > {params.MAX_ADDRS} multiaddrs")
    for a in value:
        if not isinstance(a, str):
            raise _invalid(f"{what}: multiaddr must be a string")
        if len(a.encode("utf-8")) > params.MAX_ADDR_BYTES:
            raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what}: multiaddr longer than {params.MAX_ADDR_BYTES} bytes")
        addr_peer = _addr_peer_id(a)
        if peer_id is not None and addr_peer is not None and addr_peer != peer_id:
            raise _invalid(f"{what}: /p2p/ component names another peer than the contact")
    return tuple(value)


def _sender_addrs(obj: dict) -> tuple[str, ...]:
    if 1 not in obj:
        raise _invalid("sender_addrs (key 1) missing")
    return _addrs(obj[1], "sender_addrs")


def _id(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise _invalid(f"{what} must be {ID_BYTES} bytes")
    return value


def contact_from_obj(obj: Any) -> Contact:
    if not isinstance(obj, dict):
        raise _invalid("contact must be a map")
    pid = obj.get(0)
    if not isinstance(pid, bytes) or len(pid) != PEER_ID_BYTES or not pid.startswith(ED25519_PEER_ID_PREFIX):
        raise _invalid("contact peer_id must be a 38-byte Ed25519 peer id")
    if 1 not in obj:
        raise _invalid("contact addrs (key 1) missing")
    return Contact(pid, _addrs(obj[1], "contact addrs", pid))


def contact_to_obj(c: Contact) -> dict:
    return {0: c.peer_id, 1: list(c.addrs)}


def _contacts(value: Any, what: str) -> tuple[Contact, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{what} must be an array")
    if len(value) > params.MAX_CONTACTS:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what}: {len(value)} > {params.MAX_CONTACTS} contacts")
    return tuple(contact_from_obj(c) for c in value)


def _records(value: Any, what: str, limit: int) -> tuple[Record, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{what} must be an array")
    if len(value) > limit:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{what}: {len(value)} > {limit} records")
    return tuple(record_from_obj(r) for r in value)


# --------------------------------------------------------------------------- encode


def encode(message: Request | Response) -> bytes:
    """Canonical bytes of any DHT message (ascending integer keys, spec/dht.md §3)."""
    m = message
    if isinstance(m, PingRequest):
        obj: dict = {0: PING_REQUEST, 1: list(m.sender_addrs)}
    elif isinstance(m, PingResponse):
        obj = {0: PING_RESPONSE}
    elif isinstance(m, StoreRequest):
        obj = {0: STORE_REQUEST, 1: list(m.sender_addrs), 2: [record_to_obj(r) for r in m.records]}
    elif isinstance(m, StoreResponse):
        obj = {0: STORE_RESPONSE, 1: list(m.statuses)}
    elif isinstance(m, FindNodeRequest):
        obj = {0: FIND_NODE_REQUEST, 1: list(m.sender_addrs), 2: m.target}
    elif isinstance(m, FindNodeResponse):
        obj = {0: FIND_NODE_RESPONSE, 1: [contact_to_obj(c) for c in m.contacts]}
    elif isinstance(m, FindValueRequest):
        obj = {0: FIND_VALUE_REQUEST, 1: list(m.sender_addrs), 2: list(m.keys)}
    elif isinstance(m, FindValueResponse):
        obj = {
            0: FIND_VALUE_RESPONSE,
            1: [
                {0: [record_to_obj(r) for r in res.records], 1: [contact_to_obj(c) for c in res.contacts]}
                for res in m.results
            ],
        }
    elif isinstance(m, ErrorResponse):
        obj = {0: ERROR_RESPONSE, 1: int(m.code), 2: m.message}
    else:
        raise TypeError(f"not a DHT message: {type(m).__name__}")
    return pack(obj)


# --------------------------------------------------------------------------- decode


def decode_request(data: bytes) -> Request:
    """A request from bytes; RemoteProtocolError (UNKNOWN_MESSAGE for a non-request type)."""
    mtype, obj = _top(data)
    if mtype == PING_REQUEST:
        return PingRequest(_sender_addrs(obj))
    if mtype == STORE_REQUEST:
        addrs = _sender_addrs(obj)
        recs = _array(obj, 2, "records", 1, params.MAX_RECORDS_PER_STORE)
        return StoreRequest(tuple(record_from_obj(r) for r in recs), addrs)
    if mtype == FIND_NODE_REQUEST:
        addrs = _sender_addrs(obj)
        return FindNodeRequest(_id(obj.get(2), "target"), addrs)
    if mtype == FIND_VALUE_REQUEST:
        addrs = _sender_addrs(obj)
        keys = _array(obj, 2, "keys", 1, params.MAX_KEYS_PER_FIND)
        return FindValueRequest(tuple(_id(k, "key id") for k in keys), addrs)
    raise RemoteProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"message type {mtype} is not a DHT request")


def decode_response(data: bytes) -> Response:
    """A response from bytes; RemoteProtocolError (UNKNOWN_MESSAGE for a non-response type)."""
    mtype, obj = _top(data)
    if mtype == PING_RESPONSE:
        return PingResponse()
    if mtype == STORE_RESPONSE:
        statuses = _array(obj, 1, "statuses", 1, params.MAX_RECORDS_PER_STORE)
        if not all(type(s) is int and 0 <= s < 1 << 16 for s in statuses):
            raise _invalid("statuses must be small unsigned integers")
        return StoreResponse(tuple(statuses))
    if mtype == FIND_NODE_RESPONSE:
        if 1 not in obj:
            raise _invalid("contacts (key 1) missing")
        return FindNodeResponse(_contacts(obj[1], "contacts"))
    if mtype == FIND_VALUE_RESPONSE:
        results = []
        for res in _array(obj, 1, "results", 1, params.MAX_KEYS_PER_FIND):
            if not isinstance(res, dict) or 0 not in res or 1 not in res:
                raise _invalid("each result must be a map with records (0) and contacts (1)")
            results.append(
                KeyResult(
                    _records(res[0], "result records", params.MAX_SUBKEYS_PER_KEY),
                    _contacts(res[1], "result contacts"),
                )
            )
        return FindValueResponse(tuple(results))
    if mtype == ERROR_RESPONSE:
        code, message = obj.get(1), obj.get(2)
        if type(code) is not int or not 0 <= code < 1 << 16:
            raise _invalid("error code must be a small unsigned integer")
        if not isinstance(message, str) or len(message.encode("utf-8")) > params.MAX_ERROR_MESSAGE_BYTES:
            raise _invalid("error message must be a string of at most 1024 bytes")
        return ErrorResponse(code, message)
    raise RemoteProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"message type {mtype} is not a DHT response")
