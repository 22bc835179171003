"""The receive budget (spec/transport.md §3.16): unfinished messages are bounded per stream, connection, node.

Sans-IO rules first (``transport/budget.py``), then real loopback hosts: an insider
that declares large messages and sends only part of them holds at most the
connection's budget, gets no more credit than that, and an honest caller beside it
still gets its exact answer.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from support_hostile import partial_messages
from support_transport import SWARM, run

from biopetals.protocol.errors import ErrorCode, LocalProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.mux import INITIAL_WINDOW
from biopetals.transport.budget import ReceiveBudget
from biopetals.transport.connection import TransportConfig
from biopetals.transport.errors import StreamResetError
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

MiB = 1 << 20


def test_budget_rules() -> None:
    node = ReceiveBudget(per_stream=4, per_connection=6, per_node=10)
    a, b = node.connection(), node.connection()
    refusal = a.reserve(5)
    assert refusal is not None and refusal.fatal and refusal.code == ErrorCode.LIMIT_EXCEEDED
    assert a.reserve(4) is None and a.held == 4 and node.held == 4
    wait = a.reserve(3)  # fits the stream limit, not what the connection has left: waits
    assert wait is not None and not wait.fatal
    assert b.reserve(4) is None and node.held == 8
    wait = node.connection().reserve(3)
    assert wait is not None and not wait.fatal and wait.code == ErrorCode.BUSY  # the node's 10 bytes: 8 held
    node.wait("w1")
    node.wait("w2")
    assert node.waiting == 2 and node.deferred == 2 and node.refused == 1
    assert a.release(0) == []
    assert a.release(4) == ["w1", "w2"] and node.waiting == 0 and node.held == 4
    assert b.close() == [] and node.held == 0 and b.held == 0
    assert b.release(3) == [] and node.held == 0  # nothing more than was held goes back


def test_budget_limits_must_nest() -> None:
    with pytest.raises(LocalProtocolError):
        ReceiveBudget(per_stream=8, per_connection=4, per_node=16)
    with pytest.raises(LocalProtocolError):
        TransportConfig(max_connection_buffer=MiB, max_node_buffer=MiB // 2).receive_budget()


SMALL = TransportConfig(keepalive_interval=0, max_message_buffer=1 * MiB, max_connection_buffer=2 * MiB, max_node_buffer=3 * MiB)


async def _serve(server: Host) -> None:
    async def echo(peer_id: PeerId, request: bytes) -> bytes:
        return request

    async def sink(peer_id: PeerId, stream: Stream) -> None:
        async for message in stream:
            await stream.send(len(message).to_bytes(4, "big"))

    server.set_handler("/echo/1", echo)
    server.set_stream_handler("/sink/1", sink)


def test_partial_messages_hold_at_most_the_connection_budget_and_honest_calls_go_through() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=SMALL) as server, Host(
            Identity.generate(), swarm_key=SWARM
        ) as insider, Host(Identity.generate(), swarm_key=SWARM) as honest:
            await _serve(server)
            (addr,) = await server.listen("127.0.0.1", 0)
            seen: list[int] = []

            async def watch() -> None:
                while True:
                    seen.append(server.statistics().receive_buffer_held)
                    await asyncio.sleep(0.01)

            watcher = asyncio.ensure_future(watch())
            attack = asyncio.ensure_future(
                partial_messages(insider, str(addr), "/sink/1", streams=16, declared=1 * MiB, send=MiB // 2, seconds=1.5)
            )
            await asyncio.sleep(0.3)
            # Beside the attack (which holds 2 MiB of the node's 3), an honest 1 MiB echo is exact.
            payload = os.urandom(1 * MiB)
            assert await honest.call(addr, "/echo/1", payload, timeout=10) == payload
            accepted = await attack
            watcher.cancel()
            stats = server.statistics()
            assert max(seen) <= 3 * MiB
            # Two messages got their whole reservation (credit), the others only their first window.
            assert accepted <= 2 * (MiB // 2) + 14 * INITIAL_WINDOW
            assert stats.messages_refused == 0 and stats.receive_buffer_held <= 2 * MiB  # the insider's connection budget
            await asyncio.sleep(0.1)
            assert server.statistics().receive_buffer_held == 0  # the resets gave everything back

    run(body())


async def _small_server_and_client(body) -> None:
    """``body(server, client, addr)``: a server with the SMALL budget serving /echo/1 and /sink/1."""
    async with Host(Identity.generate(), swarm_key=SWARM, config=SMALL) as server, Host(Identity.generate(), swarm_key=SWARM) as client:
        await _serve(server)
        (addr,) = await server.listen("127.0.0.1", 0)
        await body(server, client, addr)


def test_message_over_the_stream_limit_is_refused_with_a_typed_reset() -> None:
    async def body(server: Host, client: Host, addr) -> None:
        with pytest.raises(StreamResetError) as info:
            await client.call(addr, "/echo/1", bytes(2 * MiB), timeout=10)
        assert info.value.code == ErrorCode.LIMIT_EXCEEDED and "§3.16" in info.value.message
        assert server.statistics().messages_refused == 1
        assert await client.call(addr, "/echo/1", b"still here", timeout=10) == b"still here"

    run(_small_server_and_client(body))


def test_messages_over_the_connection_budget_wait_for_credit_and_all_complete() -> None:
    """Honest pipelining: 8 concurrent 1 MiB calls on one connection with a 2 MiB budget all finish, exact."""

    async def body(server: Host, client: Host, addr) -> None:
        payloads = [os.urandom(MiB - 16 - k) for k in range(8)]
        replies = await asyncio.gather(*(client.call(addr, "/echo/1", p, timeout=20) for p in payloads))
        assert replies == payloads
        stats = server.statistics()
        assert stats.receive_buffer_held == 0 and stats.messages_refused == 0

        # The same on one stream handler's stream: messages one after another, each exact.
        stream = await client.open_stream(addr, "/sink/1")
        for p in payloads[:3]:
            await stream.send(p)
            assert int.from_bytes(await stream.receive(), "big") == len(p)
        await stream.aclose()

    run(_small_server_and_client(body))
