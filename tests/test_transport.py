"""The asyncio transport over real loopback sockets with the real handshake (spec/transport.md §3).

Two ``Host``s per test, each with its own identity and the same swarm key; every
byte goes through TCP, the Noise handshake, the secure channel and the multiplexer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.transport.connection import TransportConfig
from biopetals.transport.errors import (
    ConnectionClosedError,
    DeadlineExceeded,
    EndOfStream,
    StreamResetError,
    UnknownProtocolError,
)
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

SWARM = os.urandom(32)
FAST = TransportConfig(keepalive_interval=0)  # no background pings unless a test wants them


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def two_hosts(
    body: Callable[[Host, Host], Awaitable[None]], config: TransportConfig = FAST, client_config: TransportConfig | None = None
) -> None:
    async with Host(Identity.generate(), swarm_key=SWARM, config=config) as server:
        await server.listen("127.0.0.1", 0)
        async with Host(Identity.generate(), swarm_key=SWARM, config=client_config or config) as client:
            await body(server, client)


async def echo(peer_id: PeerId, request: bytes) -> bytes:
    return request


def test_request_response_and_listen_addresses() -> None:
    async def body(server: Host, client: Host) -> None:
        server.set_handler("/echo/1", echo)
        (addr,) = server.addrs
        assert str(addr).startswith("/ip4/127.0.0.1/tcp/") and str(addr).endswith(f"/p2p/{server.peer_id}")
        assert await client.call(str(addr), "/echo/1", b"hello", timeout=5) == b"hello"
        assert await client.call(server.peer_id, "/echo/1", b"again", timeout=5) == b"again"
        seen = []

        async def who(peer_id: PeerId, request: bytes) -> bytes:
            seen.append(peer_id)
            return str(peer_id).encode()

        server.set_handler("/who/1", who)
        assert await client.call(server.peer_id, "/who/1", b"?") == str(client.peer_id).encode()

    run(two_hosts(body))


def test_errors_reach_the_caller_typed() -> None:
    async def body(server: Host, client: Host) -> None:
        async def busy(peer_id: PeerId, request: bytes) -> bytes:
            raise ProtocolError(ErrorCode.BUSY, "node overloaded, retry elsewhere")

        async def broken(peer_id: PeerId, request: bytes) -> bytes:
            raise ValueError("bug in the handler")

        server.set_handler("/busy/1", busy)
        server.set_handler("/broken/1", broken)
        addr = server.addrs[0]
        with pytest.raises(UnknownProtocolError) as unknown:
            await client.call(addr, "/nobody/1", b"x", timeout=5)
        assert unknown.value.code == ErrorCode.UNKNOWN_PROTOCOL and "/nobody/1" in unknown.value.message
        with pytest.raises(StreamResetError) as reset:
            await client.call(addr, "/busy/1", b"x", timeout=5)
        assert reset.value.code == ErrorCode.BUSY and "overloaded" in reset.value.message
        with pytest.raises(StreamResetError) as internal:
            await client.call(addr, "/broken/1", b"x", timeout=5)
        assert internal.value.code == ErrorCode.INTERNAL and "bug" not in internal.value.message
        async def empty(peer_id: PeerId, request: bytes) -> bytes:
            return b""  # messages are 1+ bytes: answered as INTERNAL, the host survives

        server.set_handler("/empty/1", empty)
        with pytest.raises(StreamResetError) as bad:
            await client.call(addr, "/empty/1", b"x", timeout=5)
        assert bad.value.code == ErrorCode.INTERNAL
        # the connection survives handler errors
        server.set_handler("/echo/1", echo)
        assert await client.call(addr, "/echo/1", b"ok", timeout=5) == b"ok"
        assert len(client.connections()) == 1

    run(two_hosts(body))


def test_bidirectional_stream_with_half_close() -> None:
    async def shout(peer_id: PeerId, stream: Stream) -> None:
        count = 0
        async for message in stream:
            await stream.send(message.upper())
            count += 1
        await stream.send(f"{count} messages".encode(), end=True)

    async def body(server: Host, client: Host) -> None:
        server.set_stream_handler("/shout/1", shout)
        stream = await client.open_stream(server.addrs[0], "/shout/1")
        for word in (b"a", b"bb", b"ccc"):
            await stream.send(word)
            assert await stream.receive() == word.upper()
        await stream.send_eof()
        assert await stream.receive() == b"3 messages"
        with pytest.raises(EndOfStream):
            await stream.receive()
        assert stream.is_closed

    run(two_hosts(body))


def test_unknown_protocol_on_a_stream_surfaces_on_receive() -> None:
    async def body(server: Host, client: Host) -> None:
        stream = await client.open_stream(server.addrs[0], "/missing/1")
        with pytest.raises(UnknownProtocolError):
            await stream.receive()

    run(two_hosts(body))


def test_32_concurrent_streams_share_one_connection() -> None:
    async def slow_echo(peer_id: PeerId, request: bytes) -> bytes:
        await asyncio.sleep(0.05)  # all 32 are in flight at once
        return request[::-1]

    async def body(server: Host, client: Host) -> None:
        server.set_handler("/rev/1", slow_echo)
        addr = server.addrs[0]
        payloads = [os.urandom(64 + 997 * i) for i in range(32)]
        started = time.perf_counter()
        replies = await asyncio.gather(*(client.call(addr, "/rev/1", p, timeout=10) for p in payloads))
        assert replies == [p[::-1] for p in payloads]
        assert time.perf_counter() - started < 1.5  # concurrent, not 32 x 50 ms
        assert len(client.connections()) == 1 and len(server.connections()) == 1
        assert server.statistics().handshakes_completed == 1

    run(two_hosts(body))


def test_big_messages_arrive_intact() -> None:
    async def body(server: Host, client: Host) -> None:
        server.set_handler("/echo/1", echo)
        big = os.urandom(16 * 1024 * 1024 + 3)
        assert await client.call(server.addrs[0], "/echo/1", big, timeout=30) == big

    run(two_hosts(body))


def test_slow_reader_bounds_the_writer_and_is_never_reset() -> None:
    """A reader pausing 2.5 s (a long GPU step) stops the writer after one window; nothing is reset."""
    message = os.urandom(256 * 1024)
    count = 48  # 12 MiB if the writer were not stopped
    config = TransportConfig(keepalive_interval=0.2, keepalive_timeout=1.0, max_window=1024 * 1024, write_buffer_high=256 * 1024)
    consumed = 0
    paused = asyncio.Event()
    reader: list[Stream] = []

    async def slow(peer_id: PeerId, stream: Stream) -> None:
        nonlocal consumed
        reader.append(stream)
        first = await stream.receive()
        consumed += len(first)
        paused.set()
        await asyncio.sleep(2.5)
        async for m in stream:
            assert m == message
            consumed += len(m)
        await stream.send(b"done", end=True)

    async def body(server: Host, client: Host) -> None:
        server.set_stream_handler("/slow/1", slow)
        stream = await client.open_stream(server.addrs[0], "/slow/1")
        conn = stream.connection

        async def writer() -> None:
            for _ in range(count):
                await stream.send(message)
            await stream.send_eof()

        task = asyncio.create_task(writer())
        await paused.wait()
        peak_ahead = peak_buffer = peak_held = 0
        for _ in range(20):  # sample for 2 s of the pause
            await asyncio.sleep(0.1)
            peak_ahead = max(peak_ahead, stream.statistics().bytes_sent - consumed)
            peak_buffer = max(peak_buffer, conn.statistics().write_buffer_size)
            peak_held = max(peak_held, reader[0].statistics().receive_buffered)
        assert not task.done()  # the writer is waiting for window, not failing
        # Sent but not consumed is bounded by the receive window (plus one message in flight),
        # nowhere near the 12 MiB the writer wants to send.
        assert peak_ahead <= config.max_window + len(message), peak_ahead
        assert peak_buffer <= config.write_buffer_high + 256 * 1024
        assert 0 < peak_held <= config.max_window  # the reader side holds at most one window
        assert not reader[0].is_closed
        await task
        assert await stream.receive() == b"done"
        assert consumed == count * len(message)
        assert conn.rtt is not None and not conn.is_closed  # keepalive kept working during the pause

    run(two_hosts(body, config=config))


def test_deadline_cancels_the_remote_handler() -> None:
    cancelled = asyncio.Event()

    async def body(server: Host, client: Host) -> None:
        async def stuck(peer_id: PeerId, request: bytes) -> bytes:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return b"late"

        server.set_handler("/stuck/1", stuck)
        server.set_handler("/echo/1", echo)
        addr = server.addrs[0]
        await client.call(addr, "/echo/1", b"warm up")
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded) as info:
            await client.call(addr, "/stuck/1", b"x", timeout=0.3)
        assert 0.25 < time.perf_counter() - started < 1.5
        assert info.value.code == ErrorCode.TIMEOUT
        await asyncio.wait_for(cancelled.wait(), 2)  # the client's RESET(TIMEOUT) stopped the work
        assert await client.call(addr, "/echo/1", b"still works") == b"still works"

    run(two_hosts(body))


def test_one_connection_is_reused_and_simultaneous_dials_are_deduplicated() -> None:
    async def body(a: Host, b: Host) -> None:
        await b.listen("127.0.0.1", 0)
        for host in (a, b):
            host.set_handler("/echo/1", echo)
        for i in range(10):
            assert await b.call(a.addrs[0], "/echo/1", b"%d" % i) == b"%d" % i
        assert len(b.connections()) == 1 and a.statistics().handshakes_completed == 1
        # Both dial each other at once: both end with the same single connection.
        await b.connection(a.peer_id).aclose()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        ca, cb = await asyncio.gather(a._dial(b.addrs[0]), b._dial(a.addrs[0]))
        for _ in range(100):
            if len(a.connections()) == 1 and len(b.connections()) == 1:
                break
            await asyncio.sleep(0.02)
        assert len(a.connections()) == 1 and len(b.connections()) == 1
        keep_a, keep_b = a.connection(b.peer_id), b.connection(a.peer_id)
        assert keep_a is not None and keep_b is not None
        assert keep_a.handshake_hash == keep_b.handshake_hash  # the same TCP connection on both sides
        assert await a.call(b.peer_id, "/echo/1", b"ab") == b"ab"
        assert await b.call(a.peer_id, "/echo/1", b"ba") == b"ba"

    run(two_hosts(body))


def test_keepalive_measures_rtt() -> None:
    config = TransportConfig(keepalive_interval=0.05, keepalive_timeout=1.0)

    async def body(server: Host, client: Host) -> None:
        conn = await client.connect(server.addrs[0])
        assert conn.rtt is None
        for _ in range(100):
            if conn.rtt is not None and server.connections()[0].rtt is not None:
                break
            await asyncio.sleep(0.02)
        assert conn.rtt is not None and 0 < conn.rtt < 0.5
        assert server.connections()[0].rtt is not None  # both sides ping
        rtt = await conn.ping(timeout=1)
        assert 0 < rtt < 0.5 and conn.statistics().min_rtt is not None

    run(two_hosts(body, config=config))


def test_peer_without_address_and_closed_host_give_clear_errors() -> None:
    async def body(server: Host, client: Host) -> None:
        stranger = Identity.generate().peer_id
        with pytest.raises(ConnectionClosedError) as info:
            await client.call(stranger, "/echo/1", b"x")
        assert "no known address" in info.value.message
        with pytest.raises(ConnectionClosedError):
            await client.connect("/ip4/127.0.0.1/tcp/1")  # nobody listens on port 1

    run(two_hosts(body))


def test_closing_a_host_fails_the_peers_streams() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as client:
            async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server:
                await server.listen()

                async def hold(peer_id: PeerId, stream: Stream) -> None:
                    await asyncio.sleep(30)

                server.set_stream_handler("/hold/1", hold)
                stream = await client.open_stream(server.addrs[0], "/hold/1")
                await stream.send(b"x")
                await asyncio.sleep(0.05)
            with pytest.raises((ConnectionClosedError, StreamResetError)):
                await asyncio.wait_for(stream.receive(), 3)
            assert client.connections() == []

    run(body())


def test_keepalive_drops_a_peer_that_stops_answering() -> None:
    config = TransportConfig(keepalive_interval=0.1, keepalive_timeout=0.3)

    async def body(server: Host, client: Host) -> None:
        conn = await client.connect(server.addrs[0])
        await asyncio.sleep(0.05)
        server.connections()[0]._transport.pause_reading()  # the peer hangs: reads nothing, answers nothing
        started = time.perf_counter()
        await asyncio.wait_for(conn.wait_closed(), 3)
        assert time.perf_counter() - started < 1.5
        with pytest.raises(ConnectionClosedError) as info:
            conn.open_stream("/echo/1")
        assert info.value.code == ErrorCode.TIMEOUT and "keepalive" in info.value.message

    run(two_hosts(body, config=FAST, client_config=config))  # only the client pings


def test_leaving_the_host_cancels_a_pending_dial_promptly() -> None:
    async def body() -> None:
        import socket as _socket

        silent = _socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        try:
            started = time.perf_counter()
            async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as client:
                dial = asyncio.create_task(client.connect(f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}", timeout=30))
                await asyncio.sleep(0.1)
            assert time.perf_counter() - started < 2  # not the 10 s handshake timeout
            with pytest.raises((asyncio.CancelledError, ConnectionClosedError)):
                await dial
        finally:
            silent.close()

    run(body())


def test_a_reused_send_buffer_cannot_corrupt_a_sent_message() -> None:
    async def last(peer_id: PeerId, stream: Stream) -> None:
        messages = [m async for m in stream]
        await stream.send(messages[-1], end=True)

    async def body(server: Host, client: Host) -> None:
        server.set_stream_handler("/last/1", last)
        stream = await client.open_stream(server.addrs[0], "/last/1")
        for _ in range(4):  # let the window grow past one send batch
            await stream.send(os.urandom(4 * 1024 * 1024))
        for _ in range(100):  # and the reader hand the credit back
            if stream.statistics().send_window > 2 * 1024 * 1024:
                break
            await asyncio.sleep(0.01)
        assert stream.statistics().send_window > 2 * 1024 * 1024
        buffer = bytearray(os.urandom(1536 * 1024))  # fits the window: no wait inside send
        expected = bytes(buffer)
        await stream.send(buffer)
        buffer[:] = bytes(len(buffer))  # the caller reuses its buffer at once
        await stream.send_eof()
        assert await stream.receive() == expected

    run(two_hosts(body))
