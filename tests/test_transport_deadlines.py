"""A stream's first message has a deadline (spec/transport.md §3.16.4), over real loopback sockets.

Streams a peer opens and never writes to - for a stream handler or a unary one - are
reset with TIMEOUT between 3/4 of ``first_message_timeout`` and all of it; a stream
whose first message arrives in time is served as usual.
"""

from __future__ import annotations

import asyncio
import time

from support_hostile import silent_streams
from support_transport import SWARM, run

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity, PeerId
from biopetals.transport.connection import TransportConfig
from biopetals.transport.errors import StreamResetError
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

TIMEOUT = 0.4
CONFIG = TransportConfig(keepalive_interval=0, first_message_timeout=TIMEOUT)


def test_silent_streams_are_reset_and_a_timely_first_message_is_served() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=CONFIG) as server, Host(
            Identity.generate(), swarm_key=SWARM
        ) as client:
            async def echo(peer_id: PeerId, request: bytes) -> bytes:
                return request

            async def chat(peer_id: PeerId, stream: Stream) -> None:
                async for message in stream:
                    await stream.send(message)

            server.set_handler("/echo/1", echo)
            server.set_stream_handler("/chat/1", chat)
            (addr,) = await server.listen("127.0.0.1", 0)
            started = time.perf_counter()
            silent = await silent_streams(client, str(addr), "/chat/1", 50)
            silent += await silent_streams(client, str(addr), "/echo/1", 50)
            # An honest stream whose first message comes late, but within the deadline.
            honest = await client.open_stream(addr, "/chat/1")
            await asyncio.sleep(TIMEOUT / 2)
            await honest.send(b"late but in time")
            assert await honest.receive() == b"late but in time"
            codes = []
            for stream in silent:
                try:
                    await asyncio.wait_for(stream.receive(), TIMEOUT * 2)
                except StreamResetError as exc:
                    codes.append(exc.code)
            elapsed = time.perf_counter() - started
            assert codes == [ErrorCode.TIMEOUT] * 100
            assert TIMEOUT * 0.7 <= elapsed <= TIMEOUT * 2.5
            # The honest stream lives on after the sweeps (it had its first message).
            await asyncio.sleep(TIMEOUT)
            await honest.send(b"still open")
            assert await honest.receive() == b"still open"
            await honest.aclose()

    run(body())


def test_a_declared_message_that_stops_coming_gives_its_reservation_back() -> None:
    """A peer that declares a message, sends part of it and stops cannot hold receive budget (§3.16.1):
    the stream is reset (TIMEOUT) once it made no progress for the deadline; a slow but steady
    sender is not."""
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=CONFIG) as server, Host(
            Identity.generate(), swarm_key=SWARM
        ) as client:
            async def sink(peer_id: PeerId, stream: Stream) -> None:
                async for message in stream:
                    await stream.send(len(message).to_bytes(4, "big"))

            server.set_stream_handler("/sink/1", sink)
            (addr,) = await server.listen("127.0.0.1", 0)
            # A first message that trickles in: 8 pieces, one every TIMEOUT / 4 (never still for a whole timeout).
            steady = await client.open_stream(addr, "/sink/1")
            await steady.send(b"first")
            assert int.from_bytes(await steady.receive(), "big") == 5
            conn = steady.connection
            piece = 1000
            conn._mux.send_data(steady.stream_id, (8 * piece).to_bytes(4, "big"))
            for _ in range(8):
                conn._mux.send_data(steady.stream_id, bytes(piece))
                conn._flush()
                await asyncio.sleep(TIMEOUT / 4)
            assert int.from_bytes(await steady.receive(), "big") == 8 * piece
            # The staller: a second message declared at 64 KiB, 1 KiB sent, then nothing.
            conn._mux.send_data(steady.stream_id, (1 << 16).to_bytes(4, "big") + bytes(1024))
            conn._flush()
            await asyncio.sleep(0.05)
            assert server.statistics().receive_buffer_held == 1 << 16
            try:
                await asyncio.wait_for(steady.receive(), TIMEOUT * 2)
                raise AssertionError("the stalled stream was not reset")
            except StreamResetError as exc:
                assert exc.code == ErrorCode.TIMEOUT and "progress" in exc.message
            assert server.statistics().receive_buffer_held == 0

    run(body())
