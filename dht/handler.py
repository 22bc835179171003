"""Answering DHT requests: the sans-IO server side shared by the asyncio node and the simulation.

See spec/dht.md §7. ``handle_bytes`` turns request bytes from an authenticated
peer into response bytes at time ``now``, and returns the contact (if any) that
the routing table wants pinged (spec/dht.md §8.1); it never does I/O itself.
"""

from __future__ import annotations

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

from . import params
from .messages import (
    STATUS_OK,
    Contact,
    ErrorResponse,
    FindNodeRequest,
    FindNodeResponse,
    FindValueRequest,
    FindValueResponse,
    KeyResult,
    PingRequest,
    PingResponse,
    Request,
    Response,
    StoreRequest,
    StoreResponse,
    decode_request,
    encode,
)
from .ratelimit import PeerRateLimiter
from .routing import RoutingTable
from .storage import Storage

#: The answer to a peer over its request rate (spec/dht.md §7), the same bytes every time.
_BUSY = encode(ErrorResponse(int(ErrorCode.BUSY), "too many requests from this peer; retry later"))


class RequestHandler:
    """Server side of one DHT node: its routing table and its storage, and optionally a
    per-peer rate limit (requests over it are answered BUSY without being decoded)."""

    def __init__(self, table: RoutingTable, storage: Storage, *, limiter: PeerRateLimiter | None = None) -> None:
        self.table = table
        self.storage = storage
        self.limiter = limiter
        self.requests_handled = 0

    def handle_bytes(self, sender_peer_id: bytes, data: bytes, now: float) -> tuple[bytes, Contact | None]:
        """Response bytes for request bytes; bad requests get an ERROR response."""
        if self.limiter is not None and not self.limiter.allow(sender_peer_id, now):
            return _BUSY, None
        try:
            request = decode_request(data)
        except RemoteProtocolError as e:
            return encode(ErrorResponse(int(e.code), e.message[: params.MAX_ERROR_MESSAGE_BYTES // 4])), None
        response, to_ping = self.handle(sender_peer_id, request, now)
        return encode(response), to_ping

    def handle(self, sender_peer_id: bytes, request: Request, now: float) -> tuple[Response, Contact | None]:
        self.requests_handled += 1
        to_ping = None
        if request.sender_addrs:  # clients without addresses stay out of tables (spec/dht.md §7)
            try:  # §3.1 rules with the authenticated sender: a /p2p/ address must name it
                sender = Contact(sender_peer_id, request.sender_addrs)
            except LocalProtocolError as e:
                return ErrorResponse(int(e.code), e.message[: params.MAX_ERROR_MESSAGE_BYTES // 4]), None
            to_ping = self.table.add_or_update(sender, now)
        if isinstance(request, PingRequest):
            return PingResponse(), to_ping
        if isinstance(request, StoreRequest):
            statuses = []
            for record in request.records:
                try:
                    self.storage.put(record, now)
                    statuses.append(STATUS_OK)
                except RemoteProtocolError as e:
                    statuses.append(int(e.code))
            return StoreResponse(tuple(statuses)), to_ping
        if isinstance(request, FindNodeRequest):
            contacts = self.table.closest(request.target, self.table.k, exclude=sender_peer_id)
            return FindNodeResponse(tuple(contacts)), to_ping
        if isinstance(request, FindValueRequest):
            results = []
            for kid in request.keys:
                records = self.storage.get(kid, now)[: params.MAX_SUBKEYS_PER_KEY]
                contacts = self.table.closest(kid, self.table.k, exclude=sender_peer_id)
                results.append(KeyResult(tuple(records), tuple(contacts)))
            return FindValueResponse(tuple(results)), to_ping
        return ErrorResponse(int(ErrorCode.UNKNOWN_MESSAGE), "not a request"), to_ping
