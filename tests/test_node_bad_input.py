"""Bad input sent to a real node process: each answered by the spec's typed Error, and the node keeps serving.

See spec/messages.md §2.5-§2.6, §5.1, §5.3, §5.6, §5.9, §7. After every bad request the
test checks that the node still serves: on a session stream the same session takes a
valid step next (its cache unchanged), and a fresh session opens and computes.
"""

from __future__ import annotations

import asyncio
import os
import time

import msgpack
import pytest
import torch

from support_models import make_tiny_checkpoint
from support_swarm import RawClient, Swarm

from biopetals.protocol.envelope import PROTOCOL_VERSION
from biopetals.models.config import model_info
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import (
    CloseSession,
    Error,
    Forward,
    NodeInfoRequest,
    OpenSession,
    Push,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    encode_message,
)
from biopetals.protocol.tensors import encode_tensor

HIDDEN = 64
IDLE = 4.0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_tokenizer=False)
    with Swarm(tmp_path_factory.mktemp("swarm")) as swarm:
        n = swarm.start_node(
            ckpt, "0:4", "--max-cache-tokens", "2048", "--max-session-tokens", "512", "--idle-timeout", str(IDLE)
        )
        yield swarm, n, model_info(ckpt).dht_prefix


def run(coro):
    return asyncio.run(coro)


def opening(model, **kw):
    args = dict(model=model, start=0, end=4, max_length=16, batch_size=1, codec="f32")
    args.update(kw)
    return OpenSession(**args)


def h(tokens=1, batch=1, hidden=HIDDEN, value=0.5):
    return torch.full((batch, tokens, hidden), value)


def raw(type_code: int, body: dict) -> bytes:
    return msgpack.packb({0: PROTOCOL_VERSION, 1: type_code, 2: body}, use_bin_type=True)


async def still_serves(client, addr, model):
    """A fresh session opens, computes a step and closes."""
    stream, opened = await client.open_session(addr, opening(model))
    assert isinstance(opened, SessionOpened), opened
    r = await client.exchange(stream, Step(session_id=opened.session_id, step_id=0, position=0, hidden=h()), "f32")
    assert isinstance(r, StepResult) and torch.isfinite(r.hidden).all()
    assert isinstance(await client.exchange(stream, CloseSession(session_id=opened.session_id)), SessionClosed)


def expect(reply, code, step_id=None):
    assert isinstance(reply, Error), reply
    assert reply.code == code, (reply.code, reply.message)
    if step_id is not None:
        assert reply.step_id == step_id
    assert reply.message


def test_session_stream_errors_keep_the_session(node):
    """On one session: each bad step is refused with its code; the session's cache is unchanged after."""
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            stream, opened = await client.open_session(n.addr, opening(model, max_length=8))
            sid = opened.session_id
            ok = await client.exchange(stream, Step(session_id=sid, step_id=0, position=0, hidden=h(2)), "f32")
            assert isinstance(ok, StepResult)
            # wrong hidden size
            expect(await client.exchange(stream, Step(session_id=sid, step_id=1, position=2, hidden=h(hidden=32))), ErrorCode.HIDDEN_SIZE_MISMATCH, 1)
            # wrong batch for the session
            expect(await client.exchange(stream, Step(session_id=sid, step_id=2, position=2, hidden=h(batch=2))), ErrorCode.INVALID_TENSOR, 2)
            # positions: a gap, an overlap, past max_length
            expect(await client.exchange(stream, Step(session_id=sid, step_id=3, position=5, hidden=h())), ErrorCode.BAD_POSITION, 3)
            expect(await client.exchange(stream, Step(session_id=sid, step_id=4, position=1, hidden=h())), ErrorCode.BAD_POSITION, 4)
            expect(await client.exchange(stream, Step(session_id=sid, step_id=5, position=2, hidden=h(7))), ErrorCode.BAD_POSITION, 5)
            # position over MAX_SEQUENCE_LENGTH: rejected by the decoder (bytes built by hand)
            body = {0: sid, 1: 6, 2: 9000, 3: encode_tensor(h(), "f32")}
            expect(await client.exchange(stream, raw(5, body)), ErrorCode.BAD_POSITION)
            # NaN and infinity in the hidden states (the constructor refuses them: patch the bytes)
            for step_id, bad in ((7, b"\x00\x00\xc0\x7f"), (8, b"\x00\x00\x80\x7f")):
                data = encode_message(Step(session_id=sid, step_id=step_id, position=2, hidden=h(value=1.5)), "f32")
                data = data.replace(b"\x00\x00\xc0\x3f", bad, 1)
                expect(await client.exchange(stream, data), ErrorCode.NON_FINITE)
            # wrong dtype: a tensor codec that does not exist
            body = {0: sid, 1: 9, 2: 2, 3: {0: "f64", 1: [1, 1, HIDDEN], 2: bytes(8 * HIDDEN)}}
            expect(await client.exchange(stream, raw(5, body)), ErrorCode.INVALID_TENSOR)
            # unknown session id on this stream
            expect(await client.exchange(stream, Step(session_id=os.urandom(16), step_id=10, position=2, hidden=h())), ErrorCode.UNKNOWN_SESSION, 10)
            # garbage, and a message not expected here
            expect(await client.exchange(stream, b"\xc1garbage"), ErrorCode.MALFORMED)
            expect(await client.exchange(stream, encode_message(NodeInfoRequest())), ErrorCode.UNKNOWN_MESSAGE)
            # too many msgpack objects: over MAX_MESSAGE_OBJECTS
            body = {0: sid, 1: 11, 2: 2, 3: encode_tensor(h(), "f32"), 9: [0] * 1000, 10: [0] * 1000, 11: [0] * 1000, 12: [0] * 1000, 13: [0] * 1000}
            expect(await client.exchange(stream, raw(5, body)), ErrorCode.LIMIT_EXCEEDED)
            # padding mask (spec/messages.md §8.1): wrong length, a byte other than 0/1, not bin
            for mask, code in ((b"\x01\x00", ErrorCode.INVALID_TENSOR), (b"\x02", ErrorCode.INVALID_FIELD),
                               ([1], ErrorCode.INVALID_FIELD)):
                body = {0: sid, 1: 11, 2: 2, 3: encode_tensor(h(), "f32"), 6: mask}
                expect(await client.exchange(stream, raw(5, body)), code)
            # the session still holds exactly 2 positions: position 2 continues it
            ok = await client.exchange(stream, Step(session_id=sid, step_id=12, position=2, hidden=h()), "f32")
            assert isinstance(ok, StepResult), ok
            # a duplicate step_id is not run again and gets no reply: the next reply answers step 13
            await stream.send(encode_message(Step(session_id=sid, step_id=12, position=3, hidden=h())))
            ok = await client.exchange(stream, Step(session_id=sid, step_id=13, position=3, hidden=h()), "f32")
            assert isinstance(ok, StepResult) and ok.step_id == 13, ok
            assert isinstance(await client.exchange(stream, CloseSession(session_id=sid)), SessionClosed)
            await still_serves(client, n.addr, model)

    run(go())


def test_open_and_request_errors(node):
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            # blocks not served, model mismatch, cache budget (per session, then total), model positions
            for message, code in (
                (opening(model, start=2, end=6), ErrorCode.BLOCKS_NOT_SERVED),
                (opening("another-model.12345678"), ErrorCode.MODEL_MISMATCH),
                (opening(model, max_length=200, batch_size=4), ErrorCode.CACHE_BUDGET),
                (opening(model, max_length=5000), ErrorCode.LIMIT_EXCEEDED),
            ):
                _, reply = await client.open_session(n.addr, message)
                expect(reply, code)
            # wrong dtype: the session's codec names no codec
            body = {0: model, 1: 0, 2: 4, 3: 16, 4: 1, 5: "f64"}
            expect(await client.request_bytes(n.addr, raw(3, body)), ErrorCode.DTYPE_MISMATCH)
            # stateless requests
            expect(await client.request(n.addr, Forward(model=model, start=0, end=4, codec="f32", hidden=h(hidden=65))), ErrorCode.HIDDEN_SIZE_MISMATCH)
            expect(await client.request(n.addr, Forward(model=model, start=4, end=5, codec="f32", hidden=h())), ErrorCode.BLOCKS_NOT_SERVED)
            # oversized: more tokens than the node takes in one request; a tensor over MAX_TENSOR_ELEMENTS
            expect(await client.request(n.addr, Forward(model=model, start=0, end=4, codec="f16", hidden=h(tokens=4096, batch=4))), ErrorCode.LIMIT_EXCEEDED)
            body = {0: model, 1: 0, 2: 4, 3: "f32", 4: {0: "f32", 1: [64, 8192, 64], 2: b""}}
            expect(await client.request_bytes(n.addr, raw(11, body)), ErrorCode.LIMIT_EXCEEDED)
            # a Push for a session that is not open (never opened / closed)
            expect(await client.request(n.addr, Push(session_id=os.urandom(16), step_id=0, position=0, hidden=h())), ErrorCode.UNKNOWN_SESSION)
            # garbage as the first message of a stream; an unknown message type
            expect(await client.request_bytes(n.addr, b"\x93\x01\x02"), ErrorCode.MALFORMED)
            expect(await client.request_bytes(n.addr, raw(99, {})), ErrorCode.UNKNOWN_MESSAGE)
            expect(await client.request_bytes(n.addr, msgpack.packb({0: PROTOCOL_VERSION + 1, 1: 1, 2: {}})), ErrorCode.UNSUPPORTED_VERSION)
            await still_serves(client, n.addr, model)

    run(go())


def test_closed_session_is_unknown(node):
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            stream, opened = await client.open_session(n.addr, opening(model))
            assert isinstance(await client.exchange(stream, CloseSession(session_id=opened.session_id)), SessionClosed)
            reply = await client.request(n.addr, Push(session_id=opened.session_id, step_id=1, position=0, hidden=h()))
            expect(reply, ErrorCode.UNKNOWN_SESSION)
            await still_serves(client, n.addr, model)

    run(go())


async def _tokens_left(client, addr) -> int:
    return (await client.request(addr, NodeInfoRequest())).cache_tokens_left


async def _wait_tokens(client, addr, expected, timeout=10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = await _tokens_left(client, addr)
        if left == expected or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.1)


def test_disconnect_mid_session_frees_the_cache(node):
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as observer:
            full = await _tokens_left(observer, n.addr)
            async with RawClient(swarm.swarm_key) as client:
                stream, opened = await client.open_session(n.addr, opening(model, max_length=100, batch_size=2))
                assert isinstance(opened, SessionOpened)
                assert isinstance(await client.exchange(stream, Step(session_id=opened.session_id, step_id=0, position=0, hidden=h(batch=2))), StepResult)
                held = await _tokens_left(observer, n.addr)
                # leaving the block drops the client's connection without CloseSession
            freed = await _wait_tokens(observer, n.addr, full)
            await still_serves(observer, n.addr, model)
            return full, held, freed

    full, held, freed = run(go())
    assert held == full - 200
    assert freed == full


def test_idle_session_times_out(node):
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key, timeout=IDLE + 10) as client:
            full = await _tokens_left(client, n.addr)
            stream, opened = await client.open_session(n.addr, opening(model, max_length=50))
            assert isinstance(opened, SessionOpened) and opened.idle_timeout == IDLE
            assert await _tokens_left(client, n.addr) == full - 50
            reply = await client.receive(stream)  # nothing sent: the node closes it
            expect(reply, ErrorCode.TIMEOUT)
            assert await _wait_tokens(client, n.addr, full) == full
            expect(await client.request(n.addr, Push(session_id=opened.session_id, step_id=0, position=0, hidden=h())), ErrorCode.UNKNOWN_SESSION)

    run(go())


def test_total_cache_budget_and_one_peers_share(node):
    """Per-session budget 512 tokens, total 2048, one peer's share 0.5 (--max-peer-cache-share, node/budget.py):
    a peer's third session of 512 is refused while another peer still opens two; the fifth is refused by the total."""
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as a, RawClient(swarm.swarm_key) as b, RawClient(swarm.swarm_key) as c:
            held = []
            for client in (a, a, b, b):
                if client is b and len(held) == 2:
                    _, refused = await a.open_session(n.addr, opening(model, max_length=256, batch_size=2))
                    expect(refused, ErrorCode.CACHE_BUDGET)
                    assert "one peer may hold" in refused.message, refused.message
                stream, opened = await client.open_session(n.addr, opening(model, max_length=256, batch_size=2))
                assert isinstance(opened, SessionOpened), opened
                held.append((client, stream, opened))
            assert await _tokens_left(c, n.addr) == 0
            _, refused = await c.open_session(n.addr, opening(model, max_length=8))
            expect(refused, ErrorCode.CACHE_BUDGET)
            for client, stream, opened in held:
                assert isinstance(await client.exchange(stream, CloseSession(session_id=opened.session_id)), SessionClosed)
            assert await _tokens_left(c, n.addr) == 2048
            await still_serves(a, n.addr, model)

    run(go())
