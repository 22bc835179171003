"""Flow-control and keepalive checks, live (spec/transport.md §3.4, §3.9).

- ``transport.flow.large-message``: the tool sends one message larger than ``INITIAL_WINDOW``
  within the window it is granted; the peer must grant credit while the message is still
  arriving (§3.4 rule 3: received bytes count as consumed as the reader assembles them), else
  the two sides deadlock, as they would on any weights chunk or long prompt.
- ``transport.flow.window-respected``: the tool asks for a reply larger than ``INITIAL_WINDOW``
  and grants no credit: the peer must stop at exactly the window (§3.4 rule 1: no overrun of
  the tool's window), wait without resetting the stream (rule 4), and finish once credit comes.
  (An overrun the other way, the tool sending beyond the window, is only observable when the
  peer's application is not reading, which a tool cannot arrange; tests/test_mux.py checks the
  reference receiver's LIMIT_EXCEEDED with the sans-IO core.)
- ``transport.keepalive.ping``: on an idle connection the peer sends a PING within
  ``KEEPALIVE_INTERVAL`` (plus slack), and the connection stays up while the tool answers.

Driven with ``wire.RawPeer``: every byte is the tool's own, including its flow control.
"""

from __future__ import annotations

import asyncio
import math

import torch

from biopetals.conformance.context import DHT_PROTOCOL, NODE_PROTOCOL
from biopetals.conformance.registry import Failed, NotApplicable, check
from biopetals.conformance.wire import ACK, DATA, FIN, PING, RESET, WINDOW_UPDATE, RawPeer
from biopetals.protocol.framing import FrameDecoder
from biopetals.protocol.messages import Forward, ForwardResult, decode_message, encode_message
from biopetals.protocol.mux import INITIAL_WINDOW, MAX_DATA_PAYLOAD

T = "spec/transport.md "
KEEPALIVE_INTERVAL = 15.0  # §3.1
KEEPALIVE_SLACK = 5.0
LARGE = INITIAL_WINDOW + 40_000  # bytes of a message above the initial window
CREDIT_WAIT = 5.0  # seconds the tool waits for credit before calling it a deadlock
STALL_WAIT = 1.5  # seconds the tool watches a stalled reply for bytes beyond its window


async def send_windowed(peer: RawPeer, sid: int, message: bytes, *, fin: bool = True) -> int:
    """Send one length-prefixed message on a fresh stream within the send window (§3.4 rule 1):
    at most ``INITIAL_WINDOW`` plus the credit the peer grants. Returns the WINDOW_UPDATEs needed.

    Fails when the window is used up and no credit arrives within ``CREDIT_WAIT`` (the peer
    waits for the whole message before granting: the trap of §3.4 rule 3)."""
    data = len(message).to_bytes(4, "big") + message
    window, pos, updates = INITIAL_WINDOW, 0, 0
    while pos < len(data):
        if window == 0:
            try:
                frames = await peer.frames_until(
                    lambda f: f.stream_id == sid and f.type in (WINDOW_UPDATE, RESET) or f.type == PING and not f.flags & ACK,
                    CREDIT_WAIT)
            except TimeoutError:
                frames = []
            last = frames[-1] if frames else None
            if last is not None and last.type == PING:
                peer.send_frame(PING, 0, last.payload, ACK)
                continue
            if last is None or last.type != WINDOW_UPDATE:
                raise Failed(f"after {pos} of {len(data)} bytes (the whole window) no WINDOW_UPDATE within {CREDIT_WAIT} s: "
                             "the peer grants credit only for complete messages and deadlocks on any message above "
                             f"{INITIAL_WINDOW} bytes (§3.4 rule 3)", received=frames[-3:])
            window += int.from_bytes(last.payload[:4], "big")
            updates += 1
            continue
        size = min(window, MAX_DATA_PAYLOAD, len(data) - pos)
        last_frame = pos + size == len(data)
        peer.send_frame(DATA, sid, data[pos:pos + size], FIN if fin and last_frame else 0)
        pos += size
        window -= size
    return updates


@check("transport.flow.large-message", T + "§3.4 rule 3, §3.10",
       f"a message of {LARGE} bytes (above the {INITIAL_WINDOW}-byte initial window), sent within the window: the peer "
       "grants credit while it arrives and answers it (a DHT PING with an unknown key)")
async def large_message(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        # A PING request with an ignored key of LARGE bytes (spec/dht.md §3: unknown keys are ignored).
        body = b"\x83\x00\x01\x01\x90\x07\xc6" + LARGE.to_bytes(4, "big") + bytes(LARGE)
        sid = peer.open_stream(DHT_PROTOCOL)
        ctx.last_sent = body[:16]
        updates = await send_windowed(peer, sid, body)
        reply = await peer.read_message(sid, 10.0)
        if reply != b"\x81\x00\x02":
            raise Failed("no PING response to a PING request of LARGE bytes", sent=body[:16], received=reply)
        return f"{updates} WINDOW_UPDATE(s) while the message arrived"
    finally:
        peer.close()


def _big_forward(info) -> Forward:
    """A valid Forward whose f32 request and reply are both larger than INITIAL_WINDOW."""
    tokens = math.ceil(LARGE / (4 * info.hidden_size))
    batch = min(64, tokens)
    hidden = torch.full((batch, math.ceil(tokens / batch), info.hidden_size), 0.125)
    return Forward(model=info.model, start=info.start, end=info.start + 1, codec="f32", hidden=hidden)


@check("transport.flow.window-respected", T + "§3.4 rules 1 and 4",
       "a reply above the initial window, with no credit granted: the peer sends exactly the window, waits without "
       "a reset, and finishes once credit comes (a Forward of f32 activations)", timeout=40)
async def window_respected(ctx):
    try:
        info = await ctx.node_info()
    except NotApplicable:
        raise NotApplicable("needs a reply above the window: the node protocol's Forward (a DHT-only peer)") from None
    request = _big_forward(info)
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        sid = peer.open_stream(NODE_PROTOCOL)
        await send_windowed(peer, sid, encode_message(request))
        reply_frames = FrameDecoder()  # the reply's framing (spec/tensors.md §6)
        received = 0
        # Phase 1, no credit: the window, then silence for STALL_WAIT s (no more DATA, no RESET).
        while received < INITIAL_WINDOW:
            data = await _stream_data(peer, sid, 20.0, received)
            received += len(data)
            reply_frames.receive_data(data)
        if received > INITIAL_WINDOW:
            raise Failed(f"the peer sent {received} bytes on the stream, {INITIAL_WINDOW} were granted (§3.4 rule 1)")
        payload = reply_frames.next_frame()
        if payload is not None:
            raise Failed(f"the reply ({received} bytes) is not above the window: the check proves nothing")
        try:
            extra = await _stream_data(peer, sid, STALL_WAIT, received)
        except TimeoutError:
            extra = b""
        if extra:
            raise Failed(f"the peer sent {len(extra)} bytes beyond the {INITIAL_WINDOW} granted (§3.4 rule 1)")
        # Phase 2: credit; the rest of the reply arrives.
        peer.send_frame(WINDOW_UPDATE, sid, (4 << 20).to_bytes(4, "big"))
        while payload is None:
            data = await _stream_data(peer, sid, 20.0, received)
            received += len(data)
            reply_frames.receive_data(data)
            payload = reply_frames.next_frame()
        reply = decode_message(payload)
        if not isinstance(reply, ForwardResult) or tuple(reply.hidden.shape) != tuple(request.hidden.shape):
            raise Failed("the reply is not the Forward's ForwardResult", received=reply)
        return f"stopped at {INITIAL_WINDOW} bytes for {STALL_WAIT} s, then sent the {received}-byte reply"
    finally:
        peer.close()


async def _stream_data(peer: RawPeer, sid: int, timeout: float, have: int) -> bytes:
    """The payload of the next DATA frame of ``sid`` (answering the peer's PINGs meanwhile);
    TimeoutError when none arrives in ``timeout``; a RESET or a close fails the check (§3.4 rule 4)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        f = await peer.next_frame(max(0.01, end - loop.time()))
        if f is None:
            raise Failed(f"the peer closed the connection after {have} reply bytes (§3.4 rule 4)")
        if f.type == PING and not f.flags & ACK:
            peer.send_frame(PING, 0, f.payload, ACK)
        elif f.stream_id == sid and f.type == RESET:
            raise Failed(f"the peer reset the stream after {have} reply bytes (§3.4 rule 4): {f.reason!r}")
        elif f.stream_id == sid and f.type == DATA:
            return f.payload


@check("transport.keepalive.ping", T + "§3.9",
       f"an idle connection gets a PING from the peer within KEEPALIVE_INTERVAL ({KEEPALIVE_INTERVAL:.0f} s) + "
       f"{KEEPALIVE_SLACK:.0f} s; answered, the connection stays up", level="SHOULD",
       timeout=KEEPALIVE_INTERVAL + KEEPALIVE_SLACK + 15, concurrent=True)
async def keepalive(ctx):
    peer = await RawPeer.connect(ctx.addr, ctx.key_bytes)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            frames = await peer.frames_until(lambda f: f.type == PING and not f.flags & ACK,
                                             KEEPALIVE_INTERVAL + KEEPALIVE_SLACK)
        except TimeoutError:
            frames = []
        if not frames or frames[-1].type != PING:
            raise Failed(f"no PING from the peer within {KEEPALIVE_INTERVAL + KEEPALIVE_SLACK:.0f} s of an idle connection",
                         received=frames[-3:])
        after = loop.time() - start
        peer.send_frame(PING, 0, frames[-1].payload, ACK)
        if not await peer.ping():
            raise Failed("the connection is not usable after answering the peer's keepalive PING")
        return f"first PING after {after:.1f} s"
    finally:
        peer.close()
