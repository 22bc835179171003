"""Transport checks: the handshake, the secure channel and the multiplexer (spec/transport.md §2-§3).

Driven with ``wire.RawPeer`` (raw TCP + the sans-IO handshake), so every byte sent and
received is the tool's own.
"""

from __future__ import annotations

import asyncio
import os

from biopetals.conformance.context import DHT_PROTOCOL
from biopetals.conformance.registry import Failed, NotApplicable, check
from biopetals.conformance.wire import (
    DATA, FIN, GO_AWAY, OPEN, PING, RESET, RawPeer, connect_tcp, frame, read_until_closed,
)
from biopetals.protocol.handshake import PROTOCOL_ID, Handshake, Role
from biopetals.protocol.identity import Identity
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

T = "spec/transport.md "
#: every peer, node or DHT-only, serves the DHT protocol: stream-level checks open streams for it
STREAM_PROTOCOL = DHT_PROTOCOL
REJECT_MAGIC = b"biopetals/reject"


def _rejection(data: bytes) -> tuple[int, str] | None:
    """(reason, protocol id) when ``data`` is exactly one Rejection frame (§2.7), else None."""
    if len(data) < 20 or int.from_bytes(data[:2], "big") != len(data) - 2 or data[2:18] != REJECT_MAGIC:
        return None
    if data[19] != len(data) - 20:
        return None
    return data[18], data[20:].decode("ascii", "replace")


async def _message1_answer(ctx, message1: bytes, wait: float = 5.0) -> tuple[bytes, bool]:
    reader, writer = await connect_tcp(ctx.addr)
    try:
        ctx.last_sent = message1
        writer.write(message1)
        return await read_until_closed(reader, wait)
    finally:
        writer.close()


def _require_private(ctx) -> None:
    if ctx.swarm_key is None:
        raise NotApplicable("run without a swarm key (public swarm)")


@check("transport.handshake.ok", T + "§2.4", "a handshake with the swarm key completes; message 2 is 203 bytes in v1")
async def handshake_ok(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        if peer.msg2_len != 203:
            raise Failed(f"message 2 is {peer.msg2_len} bytes, spec/transport.md §2.4 fixes 203 in v1")
    finally:
        peer.close()


@check("transport.handshake.peer-id", T + "§2.5 step 4, §3.12", "the peer authenticates as the /p2p/ id of its address")
async def handshake_peer_id(ctx):
    expected = ctx.multiaddr.peer_id
    if expected is None:
        raise NotApplicable("the address has no /p2p/ component")
    # RawPeer passes the expected id to the handshake, which fails with PEER_ID_MISMATCH otherwise
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    peer.close()
    if peer.peer_id != expected:
        raise Failed(f"authenticated as {peer.peer_id}, expected {expected}")


@check("transport.handshake.wrong-key", T + "§2.6, §2.7", "a wrong swarm key gets exactly one Rejection (reason 1) and a close, no message 2")
async def handshake_wrong_key(ctx):
    _require_private(ctx)
    hs = Handshake(Role.INITIATOR, Identity.generate(), os.urandom(32))
    data, closed = await _message1_answer(ctx, hs.data_to_send())
    rej = _rejection(data)
    if rej is None or rej != (1, PROTOCOL_ID) or not closed:
        raise Failed(f"expected a Rejection(reason 1, {PROTOCOL_ID}) then close; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.no-key", T + "§2.6, §2.11", "an unkeyed (public) message 1 gets a Rejection reason 1 and a close")
async def handshake_no_key(ctx):
    _require_private(ctx)
    hs = Handshake(Role.INITIATOR, Identity.generate(), None)
    data, closed = await _message1_answer(ctx, hs.data_to_send())
    if _rejection(data) != (1, PROTOCOL_ID) or not closed:
        raise Failed(f"expected a Rejection(reason 1) then close; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.keyed-to-public", T + "§2.6, §2.11", "a public peer given a keyed message 1 sends a Rejection reason 2 and closes")
async def handshake_keyed_to_public(ctx):
    if ctx.swarm_key is not None:
        raise NotApplicable("the peer is in a private swarm (checked by transport.handshake.wrong-key)")
    hs = Handshake(Role.INITIATOR, Identity.generate(), os.urandom(32))
    data, closed = await _message1_answer(ctx, hs.data_to_send())
    if _rejection(data) != (2, PROTOCOL_ID) or not closed:
        raise Failed(f"expected a Rejection(reason 2, {PROTOCOL_ID}) then close; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.other-version", T + "§2.2, §2.7", "message 1 with another prologue is rejected; the Rejection names the responder's protocol id")
async def handshake_other_version(ctx):
    _require_private(ctx)
    import biopetals.protocol.handshake as hsmod
    from biopetals.protocol.noise import HandshakeState

    state = HandshakeState(hsmod.NOISE_PROTOCOL_PRIVATE, True, prologue=b"/biopetals/noise/2", s=None, e=None, psks=[ctx.key_bytes])
    body = state.write_message(b"")
    data, closed = await _message1_answer(ctx, len(body).to_bytes(2, "big") + body)
    if _rejection(data) != (1, PROTOCOL_ID) or not closed:
        raise Failed("expected a Rejection(reason 1, /biopetals/noise/1) then close", sent=ctx.last_sent, received=data)


@check("transport.handshake.short-message1", T + "§2.6", "message 1 shorter than 32 bytes: close without an answer")
async def handshake_short(ctx):
    data, closed = await _message1_answer(ctx, b"\x00\x10" + os.urandom(16))
    if data or not closed:
        raise Failed(f"expected a close and nothing sent; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.zero-length", T + "§2.3", "a handshake frame of length 0 fails: close without an answer")
async def handshake_zero(ctx):
    data, closed = await _message1_answer(ctx, b"\x00\x00")
    if data or not closed:
        raise Failed(f"expected a close and nothing sent; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.oversize-length", T + "§2.3", "a length over 2048 fails as soon as its 2 bytes arrive (no body sent)")
async def handshake_oversize(ctx):
    data, closed = await _message1_answer(ctx, b"\x08\x01")
    if data or not closed:
        raise Failed(f"expected a close and nothing sent; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.nonempty-payload", T + "§2.4, §2.6", "an authenticated message 1 with a payload: close, no message 2")
async def handshake_payload(ctx):
    _require_private(ctx)
    import biopetals.protocol.handshake as hsmod
    from biopetals.protocol.noise import HandshakeState

    state = HandshakeState(hsmod.NOISE_PROTOCOL_PRIVATE, True, prologue=PROTOCOL_ID.encode(), s=None, e=None, psks=[ctx.key_bytes])
    body = state.write_message(b"payload")
    data, closed = await _message1_answer(ctx, len(body).to_bytes(2, "big") + body)
    if data or not closed:
        raise Failed(f"expected a close and nothing sent; closed={closed}", sent=ctx.last_sent, received=data)


@check("transport.handshake.timeout", T + "§2.10, §3.12", "a stalled handshake is closed within HANDSHAKE_TIMEOUT (10 s); the listener serves others meanwhile",
       timeout=25, concurrent=True)
async def handshake_timeout(ctx):
    reader, writer = await connect_tcp(ctx.addr)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        writer.write(b"\x00\x30")  # a length, then nothing
        peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)  # another connection meanwhile
        ok = await peer.ping()
        peer.close()
        if not ok:
            raise Failed("a second connection got no PING+ACK while a handshake stalled")
        data, closed = await read_until_closed(reader, 10.0 + 5.0 - (loop.time() - t0))
    finally:
        writer.close()
    if not closed:
        raise Failed(f"stalled handshake still open after {loop.time() - t0:.1f} s", received=data)
    return f"closed after {loop.time() - t0:.1f} s"


@check("transport.channel.bad-tag", T + "§2.8", "a secure-channel frame whose tag fails closes the connection, nothing further sent")
async def channel_bad_tag(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        junk = os.urandom(40)
        ctx.last_sent = junk
        peer.send_raw(len(junk).to_bytes(2, "big") + junk)
        data, closed = await read_until_closed(peer.reader, 5.0)
    finally:
        peer.close()
    if not closed:
        raise Failed("connection still open 5 s after a frame that fails authentication", sent=junk, received=data)
    if data:
        # bytes already in flight (e.g. a keepalive PING) are possible, but they must authenticate
        try:
            peer.channel.receive_data(data)
            while peer.channel.next_plaintext() is not None:
                pass
        except RemoteProtocolError as exc:
            raise Failed(f"bytes after the bad frame do not authenticate ({exc})", received=data)


@check("transport.channel.empty-frame", T + "§2.8", "a frame with empty plaintext is accepted and delivers nothing")
async def channel_empty_frame(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        cs = peer.channel._send  # encrypt() refuses an empty plaintext; do what a peer may do
        ct = cs.encrypt_with_ad(None, b"")
        peer.send_raw(len(ct).to_bytes(2, "big") + ct)
        if not await peer.ping():
            raise Failed("no PING+ACK after an empty frame", sent=ct)
    finally:
        peer.close()


@check("transport.mux.ping", T + "§3.9", "PING is answered by PING+ACK with the same 8 bytes")
async def mux_ping(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        if not await peer.ping():
            raise Failed("no matching PING+ACK")
    finally:
        peer.close()


@check("transport.mux.unknown-protocol", T + "§3.5", "OPEN for an unknown protocol: RESET UNKNOWN_PROTOCOL naming it; the connection stays up")
async def mux_unknown_protocol(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        name = "/conformance/no-such-protocol/1"
        sid = peer.open_stream(name, b"hello")
        frames = await peer.frames_until(lambda f: f.stream_id == sid and f.type == RESET, 5.0)
        last = frames[-1] if frames else None
        if last is None or last.type != RESET or last.code != ErrorCode.UNKNOWN_PROTOCOL:
            raise Failed("expected RESET UNKNOWN_PROTOCOL (69)", sent=name, received=frames)
        if name not in last.reason:
            raise Failed("the RESET reason does not name the protocol", received=last.reason)
        if not await peer.ping():
            raise Failed("connection unusable after the RESET")
    finally:
        peer.close()


@check("transport.mux.max-streams", T + "§3.5", "the 257th concurrent stream is refused with RESET LIMIT_EXCEEDED, not a close", timeout=30)
async def mux_max_streams(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        out = b"".join(frame(OPEN, 1 + 2 * i, STREAM_PROTOCOL.encode()) for i in range(256))
        peer.send_plain(out)
        peer.next_stream_id = 1 + 2 * 256
        if not await peer.ping(10):
            raise Failed("no PING+ACK with 256 streams open (or a stream was refused early)")
        sid = peer.open_stream(STREAM_PROTOCOL)
        frames = await peer.frames_until(lambda f: f.stream_id == sid and f.type == RESET, 10.0)
        last = frames[-1] if frames else None
        if last is None or last.stream_id != sid or last.code != ErrorCode.LIMIT_EXCEEDED:
            raise Failed("expected RESET LIMIT_EXCEEDED for stream 513", received=frames[-5:])
        if not await peer.ping():
            raise Failed("connection unusable after refusing the 257th stream")
    finally:
        peer.close()


async def _connection_error(ctx, data: bytes, code: int, what: str):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        ctx.last_sent = data
        peer.send_plain(data)
        frames = await peer.frames_until(lambda f: f.type == GO_AWAY, 5.0)
        data_after, closed = await read_until_closed(peer.reader, 5.0)
        closed = closed or peer.closed
    finally:
        peer.close()
    if not closed:
        raise Failed(f"connection still open after {what}", sent=data, received=frames)
    goaway = [f for f in frames if f.type == GO_AWAY]
    if goaway and goaway[0].code != code:
        raise Failed(f"GO_AWAY code {goaway[0].code}, expected {int(code)} ({ErrorCode(code).name})", sent=data, received=goaway[0])
    return "closed with GO_AWAY" if goaway else "closed without GO_AWAY (a SHOULD)"


@check("transport.mux.bad-version", T + "§3.2, §3.13", "a mux frame of version 2 fails the connection (GO_AWAY UNSUPPORTED_VERSION if any)")
async def mux_bad_version(ctx):
    return await _connection_error(ctx, frame(PING, 0, bytes(8), version=2), ErrorCode.UNSUPPORTED_VERSION, "a version-2 frame")


@check("transport.mux.unknown-type", T + "§3.2, §3.3", "an unknown frame type fails the connection (MALFORMED)")
async def mux_unknown_type(ctx):
    return await _connection_error(ctx, frame(9, 1, b""), ErrorCode.MALFORMED, "a frame of type 9")


@check("transport.mux.bad-flags", T + "§3.2", "a flag not allowed for the type fails the connection (MALFORMED)")
async def mux_bad_flags(ctx):
    return await _connection_error(ctx, frame(PING, 0, bytes(8), flags=0x4), ErrorCode.MALFORMED, "a PING with flag 0x4")


@check("transport.mux.never-opened", T + "§3.7", "DATA for a stream never opened fails the connection (STREAM_STATE)")
async def mux_never_opened(ctx):
    return await _connection_error(ctx, frame(DATA, 99, b"x"), ErrorCode.STREAM_STATE, "DATA on stream 99")


@check("transport.mux.wrong-parity", T + "§3.5", "OPEN with the responder's (even) parity fails the connection (STREAM_STATE)")
async def mux_wrong_parity(ctx):
    return await _connection_error(ctx, frame(OPEN, 2, STREAM_PROTOCOL.encode()), ErrorCode.STREAM_STATE, "OPEN of stream 2")


@check("transport.mux.goaway-before-close", T + "§3.8", "a peer closing for a protocol violation sends GO_AWAY with the code first", level="SHOULD")
async def mux_goaway(ctx):
    note = await _connection_error(ctx, frame(9, 1, b""), ErrorCode.MALFORMED, "a frame of type 9")
    if "without" in note:
        raise Failed("closed without GO_AWAY")


async def _stream_error(ctx, payload: bytes, flags: int, code: int, what: str):
    """Send ``payload`` as the DATA of a fresh node stream; expect RESET ``code`` on it, the connection up."""
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        sid = peer.open_stream(STREAM_PROTOCOL)
        ctx.last_sent = payload
        peer.send_frame(DATA, sid, payload, flags)
        frames = await peer.frames_until(lambda f: f.stream_id == sid and f.type in (RESET, DATA), 5.0)
        last = frames[-1] if frames else None
        if last is None or last.type != RESET or last.code != code:
            raise Failed(f"expected RESET {ErrorCode(code).name} on the stream after {what}", sent=payload, received=frames)
        if not await peer.ping():
            raise Failed("connection unusable after the reset")
    finally:
        peer.close()


@check("transport.mux.zero-length-message", T + "§3.10", "a message of length 0 resets that stream (MALFORMED); the connection stays up")
async def mux_zero_message(ctx):
    await _stream_error(ctx, b"\x00\x00\x00\x00", FIN, ErrorCode.MALFORMED, "a zero length prefix")


@check("transport.mux.oversize-message", T + "§3.10, spec/tensors.md §6", "a length prefix over MAX_FRAME_BYTES resets that stream (LIMIT_EXCEEDED)")
async def mux_oversize_message(ctx):
    await _stream_error(ctx, (128 * 1024 * 1024 + 1).to_bytes(4, "big") + b"\x80", 0, ErrorCode.LIMIT_EXCEEDED, "a length prefix of 2^27 + 1")


@check("transport.mux.fin-inside-message", T + "§3.10", "FIN inside a message resets the stream (MALFORMED)")
async def mux_fin_inside(ctx):
    await _stream_error(ctx, b"\x00\x00\x00\x10\x83", FIN, ErrorCode.MALFORMED, "FIN inside a message")
