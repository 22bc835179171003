"""The transport's hot path keeps its promises over real loopback sockets (spec/transport.md §2.8, §3.11).

A small unary call costs exactly one secure-channel frame (one encryption, one write) each way,
and the bookkeeping that replaced per-call callbacks (unary handler tasks, write batching) still
accounts for every handler, whether it finished, failed or was cancelled by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable

import pytest

from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.mux import DataReceived, Mux, StreamEnded, StreamOpened
from biopetals.transport.connection import TransportConfig
from biopetals.transport.errors import DeadlineExceeded, StreamResetError
from biopetals.transport.host import Host

SWARM = os.urandom(32)
FAST = TransportConfig(keepalive_interval=0)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def echo(peer_id: PeerId, request: bytes) -> bytes:
    return request


@pytest.mark.parametrize("size", [64, 8192, 60000])
def test_a_small_call_is_one_frame_each_way(size: int) -> None:
    async def main() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as client:
            server.set_handler("/echo/1", echo)
            (addr,) = await server.listen("127.0.0.1", 0)
            conn = await client.connect(addr)
            await client.call(conn.peer_id, "/echo/1", b"warm up", timeout=5)
            await asyncio.sleep(0.05)  # let every trailing frame of the warm-up land
            (server_conn,) = server.connections()
            sent = conn._secure.statistics().frames_sent, server_conn._secure.statistics().frames_sent
            payload = os.urandom(size)
            for _ in range(10):
                assert await client.call(conn.peer_id, "/echo/1", payload, timeout=5) == payload
            await asyncio.sleep(0.05)
            # OPEN + DATA + FIN in one encryption out; the reply's DATA + FIN in one back; no
            # WINDOW_UPDATE for a message that cannot use up half a window.
            assert conn._secure.statistics().frames_sent - sent[0] == 10
            assert server_conn._secure.statistics().frames_sent - sent[1] == 10
            assert server.statistics().handlers_running == 0
            # Finished calls leave no stream behind on either side.
            assert conn.statistics().streams_open == 0 and server_conn.statistics().streams_open == 0
            assert conn._mux.statistics().local_streams == 0 and server_conn._mux.statistics().remote_streams == 0

    run(main())


def test_handler_tasks_are_accounted_for_when_cancelled_or_failing() -> None:
    async def main() -> None:
        started = asyncio.Event()
        release = asyncio.Event()

        async def slow(peer_id: PeerId, request: bytes) -> bytes:
            started.set()
            await release.wait()
            return b"late"

        async def broken(peer_id: PeerId, request: bytes) -> bytes:
            raise RuntimeError("bug")

        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as client:
            server.set_handler("/slow/1", slow)
            server.set_handler("/broken/1", broken)
            (addr,) = await server.listen("127.0.0.1", 0)
            with pytest.raises(DeadlineExceeded):
                await client.call(addr, "/slow/1", b"x", timeout=0.2)
            assert started.is_set()
            for _ in range(50):  # the caller's RESET cancels the handler's task
                if server.statistics().handlers_running == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.statistics().handlers_running == 0
            assert not server._handler_tasks  # removed, not merely done
            with pytest.raises(StreamResetError):
                await client.call(addr, "/broken/1", b"x", timeout=5)
            assert server.statistics().handlers_running == 0
            # Many concurrent calls: every task leaves the set when it ends.
            server.set_handler("/echo/1", echo)
            results = await asyncio.gather(*(client.call(addr, "/echo/1", b"%d" % i, timeout=5) for i in range(100)))
            assert results == [b"%d" % i for i in range(100)]
            await asyncio.sleep(0.05)
            assert len(server._handler_tasks) == 0
            assert client.statistics().streams_open == 0 and server.statistics().streams_open == 0

    run(main())


def test_event_sink_sees_what_receive_data_returns() -> None:
    """``receive_data_into`` (the connection's path) and ``receive_data`` (the tested API) agree."""

    class Sink:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def __getattr__(self, name: str) -> Any:
            return lambda *args: self.calls.append((name, *args))

    a, b1, b2 = Mux(initiator=True), Mux(initiator=False), Mux(initiator=False)
    sid = a.open_stream("/x/1")
    a.send_data(sid, b"hello", end_stream=True)
    wire = a.data_to_send()
    events = b1.receive_data(wire)
    sink = Sink()
    b2.receive_data_into(wire, sink)
    assert events == [StreamOpened(sid, "/x/1"), DataReceived(sid, b"hello"), StreamEnded(sid)]
    # The three events of a unary request come as one fused call (MuxEventSink.unary_opened).
    assert sink.calls == [("unary_opened", sid, "/x/1", b"hello")]
    # Apart, they come apart: OPEN alone, then DATA without FIN, then FIN.
    a, b1, b2 = Mux(initiator=True), Mux(initiator=False), Mux(initiator=False)
    sid = a.open_stream("/x/1")
    wire = [a.data_to_send()]
    a.send_data(sid, b"hello")
    wire.append(a.data_to_send())
    a.end_stream(sid)
    wire.append(a.data_to_send())
    sink = Sink()
    events = [event for chunk in wire for event in b1.receive_data(chunk)]
    for chunk in wire:
        b2.receive_data_into(chunk, sink)
    assert events == [StreamOpened(sid, "/x/1"), DataReceived(sid, b"hello"), StreamEnded(sid)]
    assert sink.calls == [("stream_opened", sid, "/x/1"), ("data_received", sid, b"hello"), ("stream_ended", sid)]


def test_the_sink_sees_a_finished_stream_already_closed() -> None:
    """State changes come before the sink's calls: a sink may act on ``is_open`` at once (§3.5)."""
    a, b = Mux(initiator=True), Mux(initiator=False)
    sid = a.open_stream("/x/1")
    a.send_data(sid, b"request", end_stream=True)
    b.receive_data(a.data_to_send())
    b.consumed(sid, len(b"request"))
    b.send_data(sid, b"response", end_stream=True)
    seen: list[tuple[str, bool]] = []

    class Sink:
        def data_received(self, stream_id: int, data: bytes) -> None:
            seen.append(("data", a.is_open(stream_id)))
            a.consumed(stream_id, len(data))  # what a waiting reader does inside the call: no error

        def stream_ended(self, stream_id: int) -> None:
            seen.append(("end", a.is_open(stream_id)))

        def data_ended(self, stream_id: int, data: bytes) -> None:  # DATA with FIN: both at once
            self.data_received(stream_id, data)
            self.stream_ended(stream_id)

    a.receive_data_into(b.data_to_send(), Sink())  # type: ignore[arg-type]
    assert seen == [("data", False), ("end", False)]
    assert a.statistics().local_streams == 0 and not a.has_data_to_send()


def test_shared_deadline_timer_keeps_every_calls_deadline() -> None:
    """Calls share one deadline timer (Host._deadlines): out-of-order deadlines, a slow call in
    front of many fast ones, and the server hears RESET(TIMEOUT) for each call that expires."""

    async def main() -> None:
        cancelled: list[bytes] = []

        async def slow(peer_id: PeerId, request: bytes) -> bytes:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(request)
                raise
            return b"late"

        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as client:
            server.set_handler("/slow/1", slow)
            server.set_handler("/echo/1", echo)
            (addr,) = await server.listen("127.0.0.1", 0)
            conn = await client.connect(addr)
            loop = asyncio.get_running_loop()

            async def timed(request: bytes, timeout: float) -> float:
                start = loop.time()
                with pytest.raises(DeadlineExceeded):
                    await client.call(conn.peer_id, "/slow/1", request, timeout=timeout)
                return loop.time() - start

            long_call = asyncio.ensure_future(timed(b"long", 0.6))
            await asyncio.sleep(0.01)
            short_call = asyncio.ensure_future(timed(b"short", 0.15))  # earlier deadline than the one queued
            # Many fast calls finish behind the slow ones; the queue stays bounded.
            for i in range(3000):
                assert await client.call(conn.peer_id, "/echo/1", b"%d" % i, timeout=5) == b"%d" % i
            assert len(client._deadlines) <= 2 * 1024 + 2
            short, long = await short_call, await long_call
            assert 0.14 <= short < 0.5 and 0.59 <= long < 1.2
            for _ in range(100):
                if len(cancelled) == 2:
                    break
                await asyncio.sleep(0.01)
            assert sorted(cancelled) == [b"long", b"short"]  # RESET(TIMEOUT) reached the server for both
            assert server.statistics().handlers_running == 0

    run(main())
