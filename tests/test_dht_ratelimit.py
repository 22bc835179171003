"""Per-peer request rate limit of a DHT node (dht/ratelimit.py): a flooding peer is answered
BUSY (spec/dht.md §7) while everyone else is served; real sockets for the end-to-end case."""

from __future__ import annotations

import asyncio
import os

import pytest

from biopetals.dht.handler import RequestHandler
from biopetals.dht.messages import ErrorResponse, PingRequest, PingResponse, decode_response, encode
from biopetals.dht.node import DHT, DHTConfig
from biopetals.dht.params import PROTOCOL
from biopetals.dht.ratelimit import PeerRateLimiter
from biopetals.dht.routing import RoutingTable
from biopetals.dht.storage import Storage
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host


def test_bucket_allows_a_burst_then_the_rate() -> None:
    limiter = PeerRateLimiter(rate=10.0, burst=5)
    a, b = b"a" * 34, b"b" * 34
    assert [limiter.allow(a, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow(b, 0.0)  # other peers have their own bucket
    assert not limiter.allow(a, 0.05)  # half a token back
    assert limiter.allow(a, 0.15)  # a whole one
    assert not limiter.allow(a, 0.15)
    assert [limiter.allow(a, 10.0) for _ in range(6)] == [True] * 5 + [False]  # refilled to the burst, no more
    assert not limiter.allow(a, 5.0)  # a clock stepping back adds nothing
    assert limiter.refused == 6


def test_least_recently_active_peers_are_forgotten_first() -> None:
    limiter = PeerRateLimiter(rate=1.0, burst=1, max_peers=2)
    limiter.allow(b"a", 0.0)
    limiter.allow(b"b", 0.0)
    limiter.allow(b"c", 0.0)  # "a" is dropped
    assert len(limiter) == 2
    assert limiter.allow(b"a", 0.0)  # starts again with a full bucket
    assert not limiter.allow(b"c", 0.0)  # still empty


def test_handler_answers_busy_without_decoding_the_request() -> None:
    peer = Identity.generate().peer_id.multihash
    handler = RequestHandler(RoutingTable(b"\0" * 34, 20), Storage(), limiter=PeerRateLimiter(rate=1.0, burst=2))
    ping = encode(PingRequest(()))
    answers = [decode_response(handler.handle_bytes(peer, ping, 0.0)[0]) for _ in range(2)]
    assert all(isinstance(a, PingResponse) for a in answers)
    busy = decode_response(handler.handle_bytes(peer, b"\xff not even msgpack", 0.0)[0])
    assert isinstance(busy, ErrorResponse) and busy.code == ErrorCode.BUSY
    assert handler.requests_handled == 2


@pytest.mark.timeout(60)
def test_a_flooding_peer_gets_busy_and_others_are_still_served() -> None:
    async def main() -> None:
        key = os.urandom(32)
        fast = TransportConfig(keepalive_interval=0)
        async with Host(Identity.generate(), swarm_key=key, config=fast) as node_host, Host(
            Identity.generate(), swarm_key=key, config=fast
        ) as flooder, Host(Identity.generate(), swarm_key=key, config=fast) as other_host:
            await node_host.listen("127.0.0.1", 0)
            (addr,) = node_host.addrs
            async with DHT(node_host, config=DHTConfig(request_rate=5.0, request_burst=20)) as node:
                ping = encode(PingRequest(()))
                loop = asyncio.get_running_loop()
                started = loop.time()
                answers = await asyncio.gather(*(flooder.call(str(addr), PROTOCOL, ping, timeout=5) for _ in range(100)))
                refilled = 5.0 * (loop.time() - started)
                codes = [getattr(decode_response(a), "code", None) for a in answers]
                assert 20 <= codes.count(None) <= 21 + refilled  # the burst, and what refilled meanwhile
                assert codes.count(ErrorCode.BUSY) == 100 - codes.count(None)
                await other_host.listen("127.0.0.1", 0)
                async with DHT(other_host, initial_peers=[str(addr)]) as other:
                    result = await other.store("k", other_host.peer_id.multihash, b"v", node.clock() + 60)
                    assert result.accepted >= 1
                    assert (await other.get("k"))[other_host.peer_id.multihash][0] == b"v"
                stats = node.statistics()
                assert stats["requests_refused_busy"] == codes.count(ErrorCode.BUSY)

    asyncio.run(asyncio.wait_for(main(), 50))


@pytest.mark.timeout(60)
def test_a_busy_peer_stays_in_the_requesters_routing_table() -> None:
    async def main() -> None:
        key = os.urandom(32)
        fast = TransportConfig(keepalive_interval=0)
        async with Host(Identity.generate(), swarm_key=key, config=fast) as a_host, Host(
            Identity.generate(), swarm_key=key, config=fast
        ) as b_host:
            await a_host.listen("127.0.0.1", 0)
            await b_host.listen("127.0.0.1", 0)
            async with DHT(a_host, config=DHTConfig(request_rate=0.001, request_burst=1)) as a, DHT(
                b_host, initial_peers=[str(a_host.addrs[0])]
            ) as b:
                assert [c.peer_id for c in b.table.closest(a.peer_id, 20)] == [a.peer_id]  # joined on A's one token
                for _ in range(3):
                    assert await b.get("some/key") == {}
                assert a.statistics()["requests_refused_busy"] >= 3
                assert [c.peer_id for c in b.table.closest(a.peer_id, 20)] == [a.peer_id]  # busy, not gone

    asyncio.run(asyncio.wait_for(main(), 50))
