"""Connection admission and aggregated warnings (spec/transport.md §3.16.2, §3.16.3).

Sans-IO rules with plain keys and a fake clock, then real loopback hosts: idle
half-open sockets from one address are evicted by newcomers, so an honest peer
still connects; connections per peer are bounded; a keyless flood writes a
bounded number of log lines.
"""

from __future__ import annotations

import asyncio
import logging
import os

import pytest

from support_hostile import half_open_connections
from support_transport import SWARM, run

from biopetals.protocol.identity import Identity, PeerId
from biopetals.transport.admission import Admission, ConnectionLimits, raise_descriptor_limit
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host
from biopetals.transport.logs import LogAggregator


def test_pending_handshakes_evict_the_oldest_idle_one_per_address_and_in_total() -> None:
    adm = Admission(ConnectionLimits(max_pending_handshakes=5, max_pending_per_address=3))
    for k in ("a1", "a2", "a3"):
        assert adm.accept(k, "10.0.0.1") == (None, [])
    adm.progressed("a1")  # an honest peer: its first handshake message arrived
    assert adm.accept("a4", "10.0.0.1") == (None, ["a2"])  # the oldest idle one, not a1
    assert adm.accept("b1", "10.0.0.2") == (None, [])
    assert adm.accept("b2", "10.0.0.2") == (None, [])
    assert adm.pending == 5
    assert adm.accept("c1", "10.0.0.3") == (None, ["a3"])  # the total: oldest idle anywhere
    adm.progressed("a4")
    adm.progressed("b1")
    adm.progressed("b2")
    adm.progressed("c1")
    assert adm.accept("c2", "10.0.0.3") == (None, ["a1"])  # nobody idle: the oldest
    for k in ("a4", "b1", "b2", "c1", "c2", "gone"):
        adm.forget(k)
    assert adm.pending == 0 and adm.refused == {"pending per address": 1, "pending in total": 2}


def test_descriptor_headroom_refuses_before_the_limit() -> None:
    adm = Admission(ConnectionLimits(fd_headroom=100), fd_limit=1024)
    assert adm.accept("x", "10.0.0.1", fd=923) == (None, [])
    assert adm.accept("y", "10.0.0.1", fd=924) == ("descriptors", [])
    assert adm.pending == 1
    assert Admission(ConnectionLimits()).accept("z", "10.0.0.1", fd=10**6) == (None, [])  # limit unknown


def test_established_connections_per_peer_and_in_total() -> None:
    adm = Admission(ConnectionLimits(max_connections=2, max_connections_per_peer=2))
    assert adm.open("p", inbound=True) is None
    assert adm.open("p", inbound=False) is None
    assert adm.open("p", inbound=True) == "connections per peer"
    assert adm.open("q", inbound=True) is None
    assert adm.open("r", inbound=True) == "connections in total"
    assert adm.open("r", inbound=False) is None  # our own dials are not counted against inbound
    adm.close("q", inbound=True)
    assert adm.inbound == 1 and adm.open("s", inbound=True) is None


def test_raise_descriptor_limit_reaches_the_hard_limit() -> None:
    import resource

    soft = raise_descriptor_limit()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft == (None if hard == resource.RLIM_INFINITY else hard)


def test_log_aggregator_writes_one_line_per_interval_with_counts() -> None:
    logs = LogAggregator(interval=10.0)
    assert logs.note("handshake failed", "1.2.3.4", "from 1.2.3.4:5: bad key", now=0.0) == "handshake failed: from 1.2.3.4:5: bad key"
    for k in range(1000):
        assert logs.note("handshake failed", f"10.0.0.{k % 3}", "x", now=1.0 + k / 1000) is None
    assert logs.note("other kind", "p", "y", now=2.0) == "other kind: y"
    line = logs.note("handshake failed", "1.2.3.4", "again", now=10.5)
    assert line is not None and line.startswith("handshake failed: again (and 1000 more like it in the last 10 s, from 3 sources: 10.0.0.")
    assert logs.note("handshake failed", "1.2.3.4", "more", now=11.0) is None
    assert logs.flush(now=12.0) == ["handshake failed: (and 1 more like it in the last 2 s, from 1 sources: 1.2.3.4 x1)"]
    assert logs.flush(now=13.0) == [] and logs.lines == 4 and logs.events == 1004


async def _echo(peer_id: PeerId, request: bytes) -> bytes:
    return request


def test_idle_half_open_sockets_cannot_lock_out_an_honest_peer(caplog: pytest.LogCaptureFixture) -> None:
    """200 idle sockets and 200 keyless garbage handshakes from 127.0.0.1; an honest call still succeeds."""
    config = TransportConfig(keepalive_interval=0, max_pending_handshakes=64, max_pending_per_address=16)

    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=config) as server:
            server.set_handler("/echo/1", _echo)
            (addr,) = await server.listen("127.0.0.1", 0)
            socks = await half_open_connections("127.0.0.1", addr.port, 200)
            socks += await half_open_connections("127.0.0.1", addr.port, 200, send=os.urandom(64))
            try:
                await asyncio.sleep(0.3)
                assert server.statistics().handshakes_in_progress <= 16
                async with Host(Identity.generate(), swarm_key=SWARM) as client:
                    assert await client.call(addr, "/echo/1", b"hello", timeout=10) == b"hello"
                stats = server.statistics()
                assert stats.handshakes_in_progress <= 16 and stats.handshakes_failed.get("EVICTED", 0) >= 150
            finally:
                for s in socks:
                    s.close()

    with caplog.at_level(logging.WARNING, logger="biopetals.transport"):
        run(body())
    lines = [r for r in caplog.records if r.name == "biopetals.transport"]
    assert len(lines) <= 6, [r.getMessage() for r in lines]  # a few kinds, one line each (and summaries at shutdown)


def test_connections_per_peer_are_bounded() -> None:
    """Hosts with one peer id, each holding a stream open: the server keeps at most two connections and refuses more."""
    config = TransportConfig(keepalive_interval=0, max_connections_per_peer=2)

    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=config) as server:
            held = asyncio.Event()

            async def hold(peer_id: PeerId, stream) -> None:
                await held.wait()

            server.set_stream_handler("/hold/1", hold)
            (addr,) = await server.listen("127.0.0.1", 0)
            identity = Identity.generate()
            clients: list[Host] = []
            most = 0  # the most connections the server held at once (for the failure message)
            try:
                for _ in range(32):  # until the server refuses one (dedupe may retire some first: 8 tries once ran out)
                    c = Host(identity, swarm_key=SWARM)
                    await c.__aenter__()
                    clients.append(c)
                    try:
                        stream = await c.open_stream(addr, "/hold/1", timeout=5)
                        await stream.send(b"x")
                    except Exception:
                        pass
                    await asyncio.sleep(0.05)
                    most = max(most, len(server.connections()))
                    assert len(server.connections()) <= 2
                    if server._admission.refused.get("connections per peer", 0):
                        break
                # Once failed in a full clean-clone run under load (not reproduced alone or under CPU
                # stress): say what the server held, to tell a lost race from a broken limit.
                assert server._admission.refused.get("connections per peer", 0) >= 1, (
                    f"no refusal after {len(clients)} connections; at most {most} held at once; "
                    f"refused: {server._admission.refused}; handshakes: {server.statistics()}")
                held.set()
            finally:
                for c in clients:
                    await c.__aexit__(None, None, None)

    run(body())
