"""Fuzz targets for the DHT decoders: records, requests, responses (spec/dht.md §3, §7).

Invariant: any input is either parsed or raises RemoteProtocolError, and whatever
parses re-encodes to bytes that decode to the same message (so the decoder never
accepts something the encoder cannot reproduce). Records that decode are also
validated (signature, clock) to exercise rules 4.3-4.6 on arbitrary input.
"""

from __future__ import annotations

from biopetals.dht import messages
from biopetals.dht.handler import RequestHandler
from biopetals.dht.records import decode_record, encode_record, validate
from biopetals.dht.routing import RoutingTable
from biopetals.dht.storage import Storage
from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.identity import Identity

_NOW = 1_700_000_000.0
_SERVER = Identity.from_private_bytes(bytes([9]) * 32).peer_id.multihash
_SENDER = Identity.from_private_bytes(bytes([8]) * 32).peer_id.multihash


def record(data: bytes) -> None:
    r = decode_record(data)
    if decode_record(encode_record(r)) != r:
        raise AssertionError("record does not round-trip")
    try:
        validate(r, _NOW)
    except RemoteProtocolError:
        pass


def request(data: bytes) -> None:
    msg = messages.decode_request(data)
    if messages.decode_request(messages.encode(msg)) != msg:
        raise AssertionError("request does not round-trip")


def response(data: bytes) -> None:
    msg = messages.decode_response(data)
    if messages.decode_response(messages.encode(msg)) != msg:
        raise AssertionError("response does not round-trip")


def handler(data: bytes) -> None:
    """A node's whole server side: any request bytes get a decodable response, never a crash."""
    h = RequestHandler(RoutingTable(_SERVER), Storage())
    answer, _ = h.handle_bytes(_SENDER, data, _NOW)
    messages.decode_response(answer)


TARGETS = {
    "dht_record": (record, ["dht.json"]),
    "dht_request": (request, ["dht.json"]),
    "dht_response": (response, ["dht.json"]),
    "dht_handler": (handler, ["dht.json"]),
}
