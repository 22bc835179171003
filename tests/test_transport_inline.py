"""Inline unary handlers and the task-free client call path, over real loopback sockets.

``Host.set_inline_handler`` runs a plain function in the receive path once a whole request
(OPEN, DATA, FIN) has arrived (spec/transport.md §3.11; the wire is the same as for async
handlers). These tests check that it answers small and 16 MiB requests (the latter arrive
in many pieces and need window updates while buffered), that its exceptions become the same
typed errors as an async handler's while the host keeps serving, that the caller's deadline
holds, and that no task is created per request on either side.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.transport.errors import (
    DeadlineExceeded,
    StreamResetError,
    UnknownProtocolError,
)
from biopetals.transport.host import Host
from support_transport import FAST, SWARM, pair, run

MiB = 1 << 20


def test_inline_handler_answers_small_and_16_mib_requests() -> None:
    seen: list[PeerId] = []

    def reverse(peer_id: PeerId, request: bytes) -> bytes:
        seen.append(peer_id)
        return request[::-1]

    async def body(server: Host, client: Host, peer: PeerId) -> None:
        server.set_inline_handler("/rev/1", reverse)
        assert await client.call(peer, "/rev/1", b"hello", timeout=5) == b"olleh"
        assert seen == [client.peer_id]
        for size in (1, 8192, 65532, 65533, 300 * 1024):  # one frame; just over one frame; over a window
            payload = os.urandom(size)
            assert await client.call(peer, "/rev/1", payload, timeout=10) == payload[::-1]
        # 16 MiB: arrives in many DATA frames and needs WINDOW_UPDATEs while it is buffered
        # (no task is reading it); the 16 MiB response exceeds the caller's window and is
        # sent by the fallback task.
        big = os.urandom(16 * MiB)
        assert await client.call(peer, "/rev/1", big, timeout=30) == big[::-1]
        # Concurrent calls on one connection, mixed sizes.
        payloads = [os.urandom(n) for n in (10, 5000, 70000, 1 * MiB) * 4]
        results = await asyncio.gather(*(client.call(peer, "/rev/1", p, timeout=30) for p in payloads))
        assert results == [p[::-1] for p in payloads]
        await asyncio.sleep(0.05)
        stats = server.statistics()
        assert stats.inline_requests == 1 + 5 + 1 + len(payloads)
        assert stats.handlers_running == 0 and stats.streams_open == 0
        assert client.statistics().streams_open == 0

    run(pair(body))


def test_no_task_is_created_per_inline_request() -> None:
    async def body(server: Host, client: Host, peer: PeerId) -> None:
        server.set_inline_handler("/echo/1", lambda peer_id, request: request)
        created = 0
        loop = asyncio.get_running_loop()
        default_factory = loop.get_task_factory()

        def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            nonlocal created
            created += 1
            return default_factory(loop, coro, **kwargs) if default_factory else asyncio.Task(coro, loop=loop, **kwargs)

        await client.call(peer, "/echo/1", b"warm up", timeout=5)
        before = len(asyncio.all_tasks())
        loop.set_task_factory(counting_factory)
        try:
            for i in range(200):  # both hosts share this loop: counts tasks of client and server
                assert await client.call(peer, "/echo/1", b"%d" % i, timeout=5) == b"%d" % i
            await asyncio.gather(*(client.call(peer, "/echo/1", b"x" * 8192, timeout=5) for _ in range(50)))
        finally:
            loop.set_task_factory(default_factory)
        assert created == 50  # gather's own tasks, one per awaitable; none per request on either side
        assert len(asyncio.all_tasks()) == before
        assert server.statistics().inline_requests == 251

    run(pair(body))


def test_inline_handler_errors_are_typed_and_the_host_keeps_serving() -> None:
    def refuse(peer_id: PeerId, request: bytes) -> bytes:
        raise RemoteProtocolError(ErrorCode.RECORD_INVALID, "no such record")

    def crash(peer_id: PeerId, request: bytes) -> bytes:
        raise KeyError("bug in the handler")

    def empty(peer_id: PeerId, request: bytes) -> bytes:
        return b""

    async def coroutine_by_mistake(peer_id: PeerId, request: bytes) -> bytes:
        return request

    async def body(server: Host, client: Host, peer: PeerId) -> None:
        server.set_inline_handler("/refuse/1", refuse)
        server.set_inline_handler("/crash/1", crash)
        server.set_inline_handler("/empty/1", empty)
        server.set_inline_handler("/lambda/1", lambda p, r: coroutine_by_mistake(p, r))  # returns a coroutine
        server.set_inline_handler("/echo/1", lambda peer_id, request: request)
        with pytest.raises(LocalProtocolError):
            server.set_inline_handler("/async/1", coroutine_by_mistake)  # type: ignore[arg-type]
        for _ in range(3):
            with pytest.raises(StreamResetError) as info:
                await client.call(peer, "/refuse/1", b"x", timeout=5)
            assert info.value.code == ErrorCode.RECORD_INVALID and "no such record" in info.value.message
            for protocol in ("/crash/1", "/empty/1", "/lambda/1"):
                with pytest.raises(StreamResetError) as info:
                    await client.call(peer, protocol, b"x" * 70000, timeout=5)
                assert info.value.code == ErrorCode.INTERNAL
            with pytest.raises(UnknownProtocolError):
                await client.call(peer, "/missing/1", b"x", timeout=5)
            assert await client.call(peer, "/echo/1", b"still serving", timeout=5) == b"still serving"
        assert len(client.connections()) == 1  # no error closed the connection
        assert server.statistics().streams_open == 0 and client.statistics().streams_open == 0

    run(pair(body))


def test_a_request_that_is_not_exactly_one_message_is_malformed() -> None:
    async def body(server: Host, client: Host, peer: PeerId) -> None:
        calls: list[bytes] = []
        server.set_inline_handler("/echo/1", lambda peer_id, request: calls.append(request) or request)
        for messages in ([], [b"one", b"two"]):
            stream = await client.open_stream(peer, "/echo/1")
            for m in messages:
                await stream.send(m)
            await stream.send_eof()
            with pytest.raises(StreamResetError) as info:
                await stream.receive()
            assert info.value.code == ErrorCode.MALFORMED
        assert calls == []
        assert await client.call(peer, "/echo/1", b"ok", timeout=5) == b"ok"

    run(pair(body))


def test_caller_deadline_and_cancellation() -> None:
    async def body(server: Host, client: Host, peer: PeerId) -> None:
        reset_codes: list[int] = []

        async def stuck(peer_id: PeerId, stream: Any) -> None:
            await stream.receive()
            while not stream.is_closed:  # we never answer: closed only by the caller's RESET
                await asyncio.sleep(0.005)
            try:
                await stream.send(b"too late")
            except StreamResetError as exc:
                reset_codes.append(exc.code)
                raise

        server.set_stream_handler("/stuck/1", stuck)  # never answers a unary call
        server.set_inline_handler("/echo/1", lambda peer_id, request: request)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded) as info:
            await client.call(peer, "/stuck/1", b"x", timeout=0.2)
        assert 0.15 < time.perf_counter() - started < 1.5
        assert info.value.code == ErrorCode.TIMEOUT and "/stuck/1" in info.value.message
        for _ in range(100):  # the caller's RESET(TIMEOUT) reached the handler
            if reset_codes:
                break
            await asyncio.sleep(0.01)
        assert reset_codes == [ErrorCode.TIMEOUT]
        # A caller cancelled from outside resets its stream too, and leaves nothing behind.
        task = asyncio.create_task(client.call(peer, "/stuck/1", b"y", timeout=30))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if len(reset_codes) == 2:
                break
            await asyncio.sleep(0.01)
        assert reset_codes == [ErrorCode.TIMEOUT, ErrorCode.TIMEOUT]
        assert client.statistics().streams_open == 0
        # Deadlines of finished calls leave no timers behind that fire later and break anything.
        for i in range(100):
            assert await client.call(peer, "/echo/1", b"%d" % i, timeout=0.05) == b"%d" % i
        await asyncio.sleep(0.1)
        assert await client.call(peer, "/echo/1", b"after", timeout=5) == b"after"

    run(pair(body))


def test_dht_serves_inline() -> None:
    """The DHT's RPCs are answered by an inline handler (dht/node.py): no task per request."""
    from biopetals.dht.node import DHT

    async def main() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as a, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as b:
            await a.listen("127.0.0.1", 0)
            await b.listen("127.0.0.1", 0)
            async with DHT(a) as da, DHT(b, initial_peers=[str(a.addrs[0])]) as db:
                key = "test/model/block/0"
                result = await db.store(key, b.peer_id.multihash, b"value", time.time() + 60)
                assert result.accepted >= 1
                assert (await da.get(key))[b.peer_id.multihash][0] == b"value"
                assert a.statistics().inline_requests > 0

    run(main())
