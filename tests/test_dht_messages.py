"""DHT codec robustness (spec/dht.md §3, §7) and the request handler (§7.1-7.4)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biopetals.dht import params
from biopetals.dht.handler import RequestHandler
from biopetals.dht.ids import key_id
from biopetals.dht.messages import (
    Contact,
    ErrorResponse,
    FindNodeRequest,
    FindNodeResponse,
    FindValueRequest,
    FindValueResponse,
    PingRequest,
    PingResponse,
    StoreRequest,
    StoreResponse,
    decode_request,
    decode_response,
    encode,
)
from biopetals.dht.records import sign_record, to_ms
from biopetals.dht.routing import RoutingTable
from biopetals.dht.storage import Storage
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.identity import Identity

NOW = 1_700_000_000.0
A, B, S = (Identity.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 9))
ADDR = "/ip4/127.0.0.1/tcp/4001"


def test_oversized_message_rejected_before_parsing() -> None:
    data = b"\x92" + b"\xc0" * params.MAX_MESSAGE_BYTES
    with pytest.raises(RemoteProtocolError) as info:
        decode_request(data)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_huge_declared_lengths_do_not_allocate() -> None:
    # an array header claiming 2**32-1 entries, a bin header claiming 4 GiB: both tiny inputs
    for data in (b"\x81\x00\xdd\xff\xff\xff\xff", b"\x81\x00\xc6\xff\xff\xff\xff"):
        with pytest.raises(RemoteProtocolError) as info:
            decode_request(data)
        assert info.value.code == ErrorCode.MALFORMED


def test_deep_nesting_is_malformed_not_recursion_error() -> None:
    data = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(RemoteProtocolError):
        decode_request(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_remote_protocol_error(data: bytes) -> None:
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except RemoteProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.integers(-2, 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.integers(0, 6), c, max_size=4),
                    max_leaves=20))
def test_structured_garbage_raises_only_remote_protocol_error(obj) -> None:
    data = msgpack.packb({0: 3, 1: [], 2: [obj]} if not isinstance(obj, dict) else obj, use_bin_type=True)
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except RemoteProtocolError:
            pass


def _handler() -> RequestHandler:
    table = RoutingTable(S.peer_id.multihash)
    return RequestHandler(table, Storage())


def _ask(h: RequestHandler, sender: Identity, request) -> object:
    data, _ = h.handle_bytes(sender.peer_id.multihash, encode(request), NOW)
    return decode_response(data)


def test_handler_store_reports_per_record_status_and_find_value_returns_it() -> None:
    h = _handler()
    good = sign_record(A, "m.1", A.peer_id.multihash, b"a", to_ms(NOW + 60))
    forged = sign_record(B, "m.1", A.peer_id.multihash, b"b", to_ms(NOW + 60))
    expired = sign_record(B, "m.1", B.peer_id.multihash, b"b", to_ms(NOW - 1))
    far = sign_record(B, "m.1", B.peer_id.multihash, b"b", to_ms(NOW + 2 * params.MAX_TTL))
    resp = _ask(h, A, StoreRequest((good, forged, expired, far), (ADDR,)))
    assert resp == StoreResponse((0, ErrorCode.BAD_SIGNATURE, ErrorCode.RECORD_EXPIRED, ErrorCode.EXPIRATION_TOO_FAR))
    assert A.peer_id.multihash in h.table  # a sender with addresses joins the table
    resp = _ask(h, B, FindValueRequest((key_id("m.1"), key_id("other")), ()))
    assert isinstance(resp, FindValueResponse)
    assert resp.results[0].records == (good,) and resp.results[1].records == ()
    assert resp.results[0].contacts == (Contact(A.peer_id.multihash, (ADDR,)),)
    assert B.peer_id.multihash not in h.table  # no addresses: a client stays out


def test_handler_find_node_excludes_requester_and_ping() -> None:
    h = _handler()
    assert _ask(h, A, PingRequest((ADDR,))) == PingResponse()
    assert _ask(h, B, FindNodeRequest(bytes(32), (ADDR,))) == FindNodeResponse((Contact(A.peer_id.multihash, (ADDR,)),))


def test_handler_answers_garbage_with_error() -> None:
    h = _handler()
    data, _ = h.handle_bytes(A.peer_id.multihash, b"\xc1", NOW)
    resp = decode_response(data)
    assert isinstance(resp, ErrorResponse) and resp.code == ErrorCode.MALFORMED
    oversized = msgpack.packb({0: 3, 1: [], 2: [{0: "k", 1: b"", 2: b"v" * 2000, 3: 1, 4: bytes(32), 5: bytes(64)}]},
                              use_bin_type=True)
    resp = decode_response(h.handle_bytes(A.peer_id.multihash, oversized, NOW)[0])
    assert resp.code == ErrorCode.RECORD_TOO_LARGE


def test_repeated_or_negative_keys_are_malformed() -> None:
    """spec/dht.md §3: map keys are unsigned integers, each at most once (the shared reader)."""
    for data in (b"\x83\x00\x01\x01\x90\x01\x90", b"\x83\x00\x01\x01\x90\xff\x00", b"\xc1", b"\x82\x00\x01\x01\x90\x00"):
        with pytest.raises(RemoteProtocolError) as info:
            decode_request(data)
        assert info.value.code == ErrorCode.MALFORMED


def test_sender_address_naming_another_peer_is_refused() -> None:
    """spec/dht.md §3.1, §7: a /p2p/ sender address must name the authenticated sender."""
    h = _handler()
    other = f"{ADDR}/p2p/{B.peer_id}"
    reply = _ask(h, A, PingRequest((other,)))
    assert isinstance(reply, ErrorResponse) and reply.code == ErrorCode.INVALID_FIELD
    assert not len(h.table)  # not added to the routing table
    assert isinstance(_ask(h, A, PingRequest((f"{ADDR}/p2p/{A.peer_id}",))), PingResponse)
