"""The light unary stand-ins (transport/unary.py) over real loopback sockets: every way a
request or response can arrive other than "one whole message with FIN in one frame".

``UnaryCall`` (caller) and ``UnaryRequest`` (server) handle the usual case themselves and
hand everything else to a full ``Stream`` (an *upgrade*). These tests drive each of those
other cases from the far side with streams or raw multiplexer frames and check the result:
the right answer, or the typed MALFORMED error, with the host serving on and no stream left
behind on either side.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable

import pytest

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.mux import DataReceived, Mux, StreamEnded, StreamOpened
from biopetals.transport.errors import StreamResetError
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream
from support_transport import pair as host_pair
from support_transport import run

KiB = 1024


async def pair(body: Callable[[Host, Host, PeerId], Awaitable[None]]) -> None:
    """``support_transport.pair``, then: no stream left open or bytes left buffered on either side."""

    async def checked(server: Host, client: Host, peer: PeerId) -> None:
        await body(server, client, peer)
        await asyncio.sleep(0.05)  # trailing frames land
        assert client.statistics().streams_open == 0 and server.statistics().streams_open == 0
        for c in client.connections() + server.connections():
            stats = c._mux.statistics()
            assert stats.local_streams == stats.remote_streams == stats.receive_buffered == 0

    await host_pair(checked)


async def echo(peer_id: PeerId, request: bytes) -> bytes:
    return request


@pytest.mark.parametrize("inline", [False, True])
def test_request_in_separate_frames_is_served(inline: bool) -> None:
    """OPEN, DATA and FIN in three writes (a client using a stream): no fused fast path."""

    async def body(server: Host, client: Host, peer: PeerId) -> None:
        if inline:
            server.set_inline_handler("/echo/1", lambda peer_id, request: request)
        else:
            server.set_handler("/echo/1", echo)
        conn = client.connection(peer)
        assert conn is not None
        for size in (5, 8 * KiB, 100 * KiB):  # one frame; one frame; a message over two frames
            stream = conn.open_stream("/echo/1")
            await asyncio.sleep(0.01)  # the OPEN leaves alone
            payload = os.urandom(size)
            await stream.send(payload)
            await asyncio.sleep(0.01)  # the DATA leaves without FIN
            await stream.send_eof()
            assert await stream.receive_only() == payload

    run(pair(body))


@pytest.mark.parametrize("size", [65532, 65533, 200 * KiB, 1024 * KiB])
def test_big_responses_to_a_small_call(size: int) -> None:
    """A one-frame request whose response needs several frames (and window updates): the
    caller's UnaryCall hands over to a Stream, the server's UnaryRequest too."""

    async def body(server: Host, client: Host, peer: PeerId) -> None:
        response = os.urandom(size)

        async def big(peer_id: PeerId, request: bytes) -> bytes:
            return response

        server.set_handler("/big/1", big)
        server.set_inline_handler("/big-inline/1", lambda peer_id, request: response)
        assert await client.call(peer, "/big/1", b"x", timeout=10) == response
        assert await client.call(peer, "/big-inline/1", b"x", timeout=10) == response

    run(pair(body))


@pytest.mark.parametrize(
    "replies, why",
    [([], "no message"), ([b"one", b"two"], "more than one message"), ([b"one", 100 * KiB], "more than one message")],
)
def test_a_reply_that_is_not_exactly_one_message_is_malformed(replies: list[Any], why: str) -> None:
    async def body(server: Host, client: Host, peer: PeerId) -> None:
        async def bad(peer_id: PeerId, stream: Stream) -> None:
            await stream.receive()
            for reply in replies:
                await stream.send(reply if isinstance(reply, bytes) else os.urandom(reply))

        server.set_stream_handler("/bad/1", bad)
        server.set_handler("/echo/1", echo)
        with pytest.raises(RemoteProtocolError) as info:
            await client.call(peer, "/bad/1", b"request", timeout=5)
        assert info.value.code == ErrorCode.MALFORMED and why in info.value.message
        assert await client.call(peer, "/echo/1", b"still serving", timeout=5) == b"still serving"

    run(pair(body))


def test_reply_split_over_frames_with_a_separate_fin() -> None:
    async def body(server: Host, client: Host, peer: PeerId) -> None:
        async def slow_reply(peer_id: PeerId, stream: Stream) -> None:
            request = await stream.receive()
            await stream.send(request * 2)
            await asyncio.sleep(0.01)  # FIN in a later frame than the message
            await stream.send_eof()

        server.set_stream_handler("/slow/1", slow_reply)
        assert await client.call(peer, "/slow/1", b"ab", timeout=5) == b"abab"

    run(pair(body))


@pytest.mark.parametrize("inline", [False, True])
def test_fused_request_with_a_bad_length_prefix_is_malformed(inline: bool) -> None:
    """OPEN + DATA(FIN) in one frame, but the DATA is not one length-prefixed message."""

    async def body(server: Host, client: Host, peer: PeerId) -> None:
        served: list[bytes] = []
        if inline:
            server.set_inline_handler("/echo/1", lambda peer_id, request: served.append(request) or request)
        else:

            async def recording(peer_id: PeerId, request: bytes) -> bytes:
                served.append(request)
                return request

            server.set_handler("/echo/1", recording)
        conn = client.connection(peer)
        assert conn is not None
        for prefix, body_bytes in ((b"\x00\x00\x00\x09", b"abc"), (b"\x00\x00\x00\x00", b""), (b"\x00\x00", b"")):
            # Raw frames on the client's multiplexer; a Stream stands by to hear the answer.
            sid = conn._mux.open_unary("/echo/1", prefix, body_bytes, len(prefix) + len(body_bytes))
            stream = Stream(conn, sid, "/echo/1", local=True)
            stream._send_closed = True
            conn._streams[sid] = stream
            conn._flush()
            with pytest.raises(StreamResetError) as info:
                await stream.receive()
            assert info.value.code == ErrorCode.MALFORMED
        assert served == []
        assert await client.call(peer, "/echo/1", b"fine", timeout=5) == b"fine"

    run(pair(body))


def test_fused_events_match_the_separate_ones() -> None:
    """``unary_opened`` and ``data_ended`` (the fused sink calls) say what the separate events say."""
    a, b = Mux(initiator=True), Mux(initiator=False)
    sid = a.open_unary("/x/1", b"\x00\x00\x00\x05", b"hello", 9)
    assert b.receive_data(a.data_to_send()) == [
        StreamOpened(sid, "/x/1"),
        DataReceived(sid, b"\x00\x00\x00\x05hello"),
        StreamEnded(sid),
    ]
    b.consumed(sid, 9)
    b.send_last_message(sid, b"\x00\x00\x00\x02", b"ok", 6)
    assert a.receive_data(b.data_to_send()) == [DataReceived(sid, b"\x00\x00\x00\x02ok"), StreamEnded(sid)]
    assert a.statistics().local_streams == 0 and b.statistics().remote_streams == 0
    assert b.statistics().receive_buffered == 0


def test_open_unary_refuses_more_than_one_frame() -> None:
    a = Mux(initiator=True)
    with pytest.raises(Exception) as info:
        a.open_unary("/x/1", b"", b"x" * (64 * KiB + 1), 64 * KiB + 1)
    assert getattr(info.value, "code", None) == ErrorCode.LIMIT_EXCEEDED
    assert a.statistics().local_streams == 0 and not a.has_data_to_send()


@pytest.mark.parametrize("with_open", [False, True])
def test_the_whole_buffer_fast_path_still_refuses_an_oversized_data_frame(with_open: bool) -> None:
    """A DATA frame over MAX_DATA_PAYLOAD is LIMIT_EXCEEDED even when it is the whole input,
    the shape the multiplexer's small-call fast path takes (``Mux._receive_unary``)."""
    import struct

    a, b = Mux(initiator=True), Mux(initiator=False, max_window=4 * 1024 * KiB)
    size = 64 * KiB + 1
    name = b"/x/1"
    if with_open:
        wire = struct.pack(">BBHII", 1, 4, 0, 1, len(name)) + name
    else:
        sid = a.open_stream("/x/1")
        b.receive_data(a.data_to_send())
        b._streams[sid].recv_window = 2 * size  # as if WINDOW_UPDATEs had granted it
        wire = b""
    wire += struct.pack(">BBHII", 1, 0, 1, 1, size) + bytes(size)
    with pytest.raises(RemoteProtocolError) as info:
        b.receive_data(wire)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
