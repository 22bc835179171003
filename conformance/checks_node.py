"""Node checks: every message of spec/messages.md with valid and invalid content, as a client sees it.

Expected codes come from the spec's tables (§2.5, §5, §6, §7.2) and from the ``invalid``
vectors of spec/vectors/messages.json, never from our node. What the node serves (model,
span, hidden size) is read from its NodeInfo, itself checked by the spec's decoder.
"""

from __future__ import annotations

import asyncio
import os

import msgpack
import torch

from biopetals.conformance.context import NODE_PROTOCOL
from biopetals.protocol.envelope import PROTOCOL_VERSION
from biopetals.conformance.registry import Failed, NotApplicable, check
from biopetals.conformance.vectors import envelope_type, load_or_stub, slug as _slug, spec_of as _spec_of
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.transport.errors import EndOfStream
from biopetals.protocol.limits import MAX_BATCH, MAX_BLOCKS, MAX_SEQUENCE_LENGTH
from biopetals.protocol.messages import (
    Backward, BackwardResult, CloseSession, Error, Forward, ForwardResult, Hop, NodeInfo, NodeInfoRequest,
    OpenSession, Push, PushAck, SessionClosed, SessionOpened, SetUpstream, Step, StepResult, decode_message,
    encode_message,
)

M = "spec/messages.md "
QUIET = 1.0  # seconds of silence that count as "no reply" (duplicates)


# ----------------------------------------------------------------------------- helpers


def _h(info, tokens=1, batch=1, hidden=None, value=0.25):
    return torch.full((batch, tokens, hidden or info.hidden_size), value)


def _decode(data: bytes, sent):
    try:
        return decode_message(data)
    except Exception as exc:
        raise Failed(f"reply does not decode by spec/messages.md §2.5: {exc}", sent=sent, received=data) from None


def expect_error(reply, code, *, sent=None, step_id=None, raw=None):
    """``reply`` must be an Error with exactly ``code`` (and ``step_id`` when given)."""
    want = ErrorCode(code)
    if not isinstance(reply, Error):
        raise Failed(f"expected Error {want.name} ({int(want)}), got {type(reply).__name__}", sent=sent, received=raw or reply)
    if reply.code != want:
        name = ErrorCode(reply.code).name if reply.code in ErrorCode._value2member_map_ else "?"
        raise Failed(f"expected Error {want.name} ({int(want)}), got {name} ({reply.code}): {reply.message!r}", sent=sent, received=raw or reply)
    if step_id is not None and reply.step_id != step_id:
        raise Failed(f"Error does not repeat step_id {step_id} (§2.6): {reply.step_id}", sent=sent, received=reply)


async def request(ctx, data: bytes, timeout: float = 10.0):
    """One request/response on a fresh stream: (decoded reply, raw reply)."""
    raw = await ctx.call(NODE_PROTOCOL, data, timeout=timeout)
    return _decode(raw, data), raw


class Session:
    """A session stream opened by hand (spec/messages.md §2.1, §5)."""

    def __init__(self, ctx, stream, opened, info):
        self.ctx, self.stream, self.opened, self.info = ctx, stream, opened, info
        self.sid = opened.session_id if isinstance(opened, SessionOpened) else None
        self.position = 0
        self.step_id = 0

    @classmethod
    async def open(cls, ctx, host=None, **kw):
        """Open a session; its upstream is the opening host itself (the checks push from it, §5.10)."""
        info = await ctx.node_info()
        host = host or await ctx.host()
        args = dict(model=info.model, start=info.start, end=info.end, max_length=16, batch_size=1, codec="f32",
                    upstream=host.peer_id)
        args.update(kw)
        data = encode_message(OpenSession(**args))
        stream = await host.open_stream(ctx.addr, NODE_PROTOCOL, timeout=10)
        ctx.last_sent = data
        await stream.send(data)
        raw = await asyncio.wait_for(stream.receive(), 10)
        return cls(ctx, stream, _decode(raw, data), info), data, raw

    @classmethod
    async def opened_ok(cls, ctx, host=None, **kw):
        s, data, raw = await cls.open(ctx, host, **kw)
        if not isinstance(s.opened, SessionOpened):
            raise Failed("a valid OpenSession was not answered SessionOpened", sent=data, received=s.opened)
        return s

    async def send(self, message) -> bytes:
        data = message if isinstance(message, bytes) else encode_message(message)
        self.ctx.last_sent = data
        await self.stream.send(data)
        return data

    async def receive(self, timeout: float = 10.0):
        raw = await asyncio.wait_for(self.stream.receive(), timeout)
        return _decode(raw, self.ctx.last_sent), raw

    async def exchange(self, message, timeout: float = 10.0):
        sent = await self.send(message)
        reply, raw = await self.receive(timeout)
        return reply, raw, sent

    def step(self, tokens=1, **kw):
        args = dict(session_id=self.sid, step_id=self.step_id, position=self.position, hidden=_h(self.info, tokens))
        args.update(kw)
        return Step(**args)

    async def good_step(self, tokens=1, what="a valid Step"):
        msg = self.step(tokens)
        reply, raw, sent = await self.exchange(msg)
        if not isinstance(reply, StepResult) or reply.step_id != msg.step_id or reply.session_id != self.sid:
            raise Failed(f"{what} was not answered by its StepResult", sent=sent, received=reply)
        if tuple(reply.hidden.shape) != tuple(msg.hidden.shape):
            raise Failed(f"StepResult shape {tuple(reply.hidden.shape)} differs from the step's (§5.5)", received=reply)
        self.step_id += 1
        self.position += tokens
        return reply, raw

    async def close(self):
        try:
            await self.send(CloseSession(session_id=self.sid))
            await self.receive(5)
        except Exception:
            pass


def require_capability(s: Session, info: NodeInfo, name: str, older: str) -> None:
    """A session's ``SessionOpened`` and the node's ``NodeInfo`` say the same of capability ``name``
    (``rollback``, ``keepalive``: spec/messages.md §4.2, §5.2), else ``Failed``; ``NotApplicable`` when
    neither says it (a node of revision ``older``)."""
    said = isinstance(s.opened, SessionOpened) and getattr(s.opened, name) == 1
    if said != (getattr(info, name) == 1):
        raise Failed(f"SessionOpened.{name} {getattr(s.opened, name, None)} and NodeInfo.{name} "
                     f"{getattr(info, name)} differ (§4.2, §5.2)", received=s.opened)
    if not said:
        raise NotApplicable(f"the node does not say {name} (revision {older})")


async def _quiet(sess: Session, seconds: float = QUIET):
    """Nothing arrives on the session stream for ``seconds`` (None), or what arrived."""
    try:
        reply, _ = await sess.receive(seconds)
        return reply
    except TimeoutError:
        return None


def _reply_codec(raw: bytes, key: int) -> str | None:
    try:
        return msgpack.unpackb(raw, strict_map_key=False)[2][key][0]
    except Exception:
        return None


# ----------------------------------------------------------------------------- node info, envelope


@check("node.info", M + "§4.1, §4.2", "NodeInfoRequest is answered by a NodeInfo valid by §4.2 (start < end)")
async def node_info(ctx):
    info = await ctx.node_info()
    return f"{info.model} [{info.start}, {info.end}) hidden {info.hidden_size}"


@check("node.envelope.unknown-keys", M + "§2.4, spec/README.md §3", "unknown keys in the envelope and body are ignored")
async def unknown_keys(ctx):
    await ctx.node_info()
    data = msgpack.packb({0: PROTOCOL_VERSION, 1: 1, 2: {77: "later"}, 9: [1, 2]})
    reply, raw = await request(ctx, data)
    if not isinstance(reply, NodeInfo):
        raise Failed("expected NodeInfo", sent=data, received=reply)


@check("node.envelope.non-canonical", M + "§2.3", "a non-canonical encoding (keys out of order, uint 16) is accepted")
async def non_canonical(ctx):
    await ctx.node_info()
    data = bytes.fromhex("83" "02" "80" "01" "cd0001" "00" "cd") + PROTOCOL_VERSION.to_bytes(2, "big")
    reply, raw = await request(ctx, data)
    if not isinstance(reply, NodeInfo):
        raise Failed("expected NodeInfo", sent=data, received=reply)


@check("node.stream.step-first", M + "§2.1", "Step as the first message of a stream: Error UNKNOWN_MESSAGE")
async def step_first(ctx):
    info = await ctx.node_info()
    data = encode_message(Step(session_id=os.urandom(16), step_id=0, position=0, hidden=_h(info)))
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=data)


@check("node.stream.reply-to-node", M + "§2.1", "a reply message sent to a node (SessionClosed): Error UNKNOWN_MESSAGE")
async def reply_to_node(ctx):
    await ctx.node_info()
    data = encode_message(SessionClosed(session_id=os.urandom(16)))
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=data)


# ----------------------------------------------------------------------------- the invalid vectors


REQUEST_TYPES = {1, 3, 9, 11, 13}  # first message of a stream (§2.1)
SESSION_TYPES = {5, 7, 16}  # on an open session stream
ENVELOPE_STEPS = ("step 2", "step 3", "step 4", "step 5", "step 6", "§2.2", "§2.4")


def vector_route(v: dict) -> str | None:
    """Where a node must see an invalid vector for its code to be pinned by the spec.

    "request": first message of a fresh stream; "session": on an open session stream (a
    Step or CloseSession is only expected there, §2.1: an unexpected type is UNKNOWN_MESSAGE
    before its body is read, so a body error shows only where its type is expected;
    the ``unexpected`` vectors check the other places);
    None: a reply type with a body error, which the spec does not pin for a node (§2.1
    vs §2.6: a node never receives replies); offline vectors check those.
    """
    data = bytes.fromhex(v["hex"])
    if not data:
        return None  # an empty message cannot be framed (n >= 1): transport.mux.zero-length-message
    mtype = envelope_type(data)
    envelope_level = any(s in v["rule"] for s in ENVELOPE_STEPS)
    if mtype in SESSION_TYPES and not envelope_level:
        return "session"
    if mtype in REQUEST_TYPES or envelope_level or mtype is None:
        return "request"
    return None


def _register_vectors():
    doc = load_or_stub("messages.json", check, "node.vectors", M + "§9")
    if doc is None:
        return
    for v in doc["invalid"]:
        route = vector_route(v)
        if route is None:
            continue
        data = bytes.fromhex(v["hex"])
        code = ErrorCode[v["error"]]

        async def run(ctx, data=data, code=code, route=route):
            if route == "request":
                await ctx.node_info()
                reply, raw = await request(ctx, data)
                expect_error(reply, code, sent=data, raw=raw)
                return
            s = await Session.opened_ok(ctx)
            try:
                reply, raw, sent = await s.exchange(data)
                expect_error(reply, code, sent=data, raw=raw)
            finally:
                await s.close()

        where = "as a request" if route == "request" else "on a session stream"
        check(f"node.vector.{_slug(v['name'])}", _spec_of(v["rule"], M),
              f"invalid vector {v['name']!r} {where}: Error {v['error']}")(run)


_register_vectors()


def _register_unexpected():
    """The ``unexpected`` vectors (§2.1, §2.5 step 5): a type not expected in its place is
    UNKNOWN_MESSAGE whatever its body; one check per place, every vector of it in turn."""
    doc = load_or_stub("messages.json", check, "node.unexpected", M + "§2.1")
    if doc is None:
        return
    first = [bytes.fromhex(v["hex"]) for v in doc.get("unexpected", []) if v["where"] == "first"]
    on_session = [bytes.fromhex(v["hex"]) for v in doc.get("unexpected", []) if v["where"] == "session"]

    @check("node.unexpected.first", M + "§2.1, §2.5 step 5",
           f"{len(first)} 'unexpected' vectors as a stream's first message (Step, CloseSession, replies; many with "
           "a broken body): Error UNKNOWN_MESSAGE each, never the body's code")
    async def unexpected_first(ctx):
        await ctx.node_info()
        for data in first:
            reply, raw = await request(ctx, data)
            expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=data, raw=raw)
        return f"{len(first)} vectors"

    @check("node.unexpected.session", M + "§2.1, §2.5 step 5",
           f"{len(on_session)} 'unexpected' vectors on one open session stream: Error UNKNOWN_MESSAGE each, "
           "then the session still serves a valid Step")
    async def unexpected_session(ctx):
        s = await Session.opened_ok(ctx)
        try:
            for data in on_session:
                reply, raw, sent = await s.exchange(data)
                expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=sent, raw=raw)
            await s.good_step(1, "a valid Step after the unexpected messages")
        finally:
            await s.close()
        return f"{len(on_session)} vectors"


_register_unexpected()


# ----------------------------------------------------------------------------- sessions


@check("node.open.ok", M + "§5.1, §5.2", "a valid OpenSession with a chosen id: SessionOpened with that id and idle_timeout > 0")
async def open_ok(ctx):
    sid = os.urandom(16)
    s = await Session.opened_ok(ctx, session_id=sid)
    try:
        if s.opened.session_id != sid:
            raise Failed("SessionOpened does not carry the chosen session id", received=s.opened)
    finally:
        await s.close()


@check("node.open.node-chosen-id", M + "§5.1", "without a session_id the node chooses one: 16 random bytes (RECOMMENDED), different per session", level="SHOULD")
async def open_chosen_id(ctx):
    a = await Session.opened_ok(ctx)
    b = await Session.opened_ok(ctx)
    try:
        if len(a.sid) != 16 or a.sid == b.sid:
            raise Failed(f"session ids {a.sid.hex()} and {b.sid.hex()}: expected 16 random bytes each", received=(a.opened, b.opened))
    finally:
        await a.close()
        await b.close()


@check("node.open.id-in-use", M + "§5.1", "OpenSession with a session id already open: Error INVALID_FIELD")
async def open_in_use(ctx):
    sid = os.urandom(16)
    s = await Session.opened_ok(ctx, session_id=sid)
    try:
        t, data, raw = await Session.open(ctx, session_id=sid)
        expect_error(t.opened, ErrorCode.INVALID_FIELD, sent=data, raw=raw)
    finally:
        await s.close()


@check("node.open.model-mismatch", M + "§5.1, §7.2", "OpenSession naming another model: Error MODEL_MISMATCH")
async def open_model(ctx):
    info = await ctx.node_info()
    s, data, raw = await Session.open(ctx, model=info.model + ".not-this-one")
    expect_error(s.opened, ErrorCode.MODEL_MISMATCH, sent=data, raw=raw)


@check("node.open.blocks-not-served", M + "§5.1, §7.2", "OpenSession for a span outside the node's: Error BLOCKS_NOT_SERVED")
async def open_blocks(ctx):
    info = await ctx.node_info()
    if info.end >= MAX_BLOCKS:
        raise NotApplicable("the node serves up to MAX_BLOCKS")
    s, data, raw = await Session.open(ctx, start=info.start, end=info.end + 1)
    expect_error(s.opened, ErrorCode.BLOCKS_NOT_SERVED, sent=data, raw=raw)


@check("node.open.unknown-codec", M + "§5.1, spec/README.md §3", "OpenSession naming an unknown codec: Error DTYPE_MISMATCH")
async def open_codec(ctx):
    info = await ctx.node_info()
    data = msgpack.packb({0: PROTOCOL_VERSION, 1: 3, 2: {0: info.model, 1: info.start, 2: info.end, 3: 8, 4: 1, 5: "f64"}})
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.DTYPE_MISMATCH, sent=data, raw=raw)


@check("node.open.cache-budget", M + "§5.1, §7.2", "OpenSession over the node's free cache (cache_tokens_left): Error CACHE_BUDGET")
async def open_budget(ctx):
    info = await ctx.node_info()
    length = info.cache_tokens_left // MAX_BATCH + 1
    if length > MAX_SEQUENCE_LENGTH:
        raise NotApplicable(f"cache_tokens_left {info.cache_tokens_left} is more than any one session can ask")
    s, data, raw = await Session.open(ctx, batch_size=MAX_BATCH, max_length=length)
    if isinstance(s.opened, Error) and s.opened.code == ErrorCode.LIMIT_EXCEEDED:
        return f"LIMIT_EXCEEDED: the model has fewer than {length} positions (§5.1 checks that first)"
    expect_error(s.opened, ErrorCode.CACHE_BUDGET, sent=data, raw=raw)


@check("node.step.ok", M + "§5.3, §5.5, §8", "a valid Step: StepResult with its session, step_id, the step's shape, in the session's codec")
async def step_ok(ctx):
    s = await Session.opened_ok(ctx, codec="f16")
    try:
        reply, raw = await s.good_step(2)
        if _reply_codec(raw, 2) != "f16":
            raise Failed(f"StepResult hidden in codec {_reply_codec(raw, 2)!r}, the session named 'f16' (§8)", received=raw)
        if not torch.isfinite(reply.hidden).all():
            raise Failed("non-finite values in a StepResult (§7.3)")
        await s.good_step(1, "a second Step at the next position")
    finally:
        await s.close()


async def _bad_step(ctx, make, code, what):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        await s.good_step(2)
        msg = make(s)
        reply, raw, sent = await s.exchange(msg)
        expect_error(reply, code, sent=sent, step_id=msg.step_id, raw=raw)
        s.step_id = msg.step_id + 1
        await s.good_step(1, f"a valid Step after {what} (the failed step must leave the session as it was, §2.6)")
    finally:
        await s.close()


@check("node.step.position-gap", M + "§5.6", "a Step with position > cache length: BAD_POSITION; the session is unchanged")
async def step_gap(ctx):
    await _bad_step(ctx, lambda s: s.step(position=s.position + 1), ErrorCode.BAD_POSITION, "a gap")


@check("node.step.position-overlap", M + "§5.6", "a Step with position < cache length: BAD_POSITION; the session is unchanged")
async def step_overlap(ctx):
    await _bad_step(ctx, lambda s: s.step(position=s.position - 1), ErrorCode.BAD_POSITION, "an overlap")


@check("node.step.over-max-length", M + "§5.6", "position + tokens > max_length: BAD_POSITION; the session is unchanged")
async def step_over(ctx):
    await _bad_step(ctx, lambda s: s.step(hidden=_h(s.info, 7)), ErrorCode.BAD_POSITION, "a step past max_length")


@check("node.step.batch-mismatch", M + "§5.3", "hidden batch other than the session's batch_size: INVALID_TENSOR")
async def step_batch(ctx):
    await _bad_step(ctx, lambda s: s.step(hidden=_h(s.info, batch=2)), ErrorCode.INVALID_TENSOR, "a wrong batch")


@check("node.step.hidden-size", M + "§5.3, §7.2", "hidden dimension other than the model's: HIDDEN_SIZE_MISMATCH")
async def step_hidden(ctx):
    await _bad_step(ctx, lambda s: s.step(hidden=_h(s.info, hidden=s.info.hidden_size + 1)), ErrorCode.HIDDEN_SIZE_MISMATCH, "a wrong hidden size")


@check("node.step.unknown-session", M + "§5.3, §5.9", "a Step naming a session that is not the stream's: UNKNOWN_SESSION")
async def step_unknown(ctx):
    await _bad_step(ctx, lambda s: s.step(session_id=os.urandom(16)), ErrorCode.UNKNOWN_SESSION, "an unknown session")


@check("node.step.prompts-blocks", M + "§5.3", "prompts without next not covering exactly the session's span: INVALID_TENSOR")
async def step_prompts(ctx):
    def make(s):
        blocks = s.info.end - s.info.start + 1
        return s.step(prompts=torch.zeros(blocks, 1, 1, s.info.hidden_size))

    await _bad_step(ctx, make, ErrorCode.INVALID_TENSOR, "prompts for too many blocks")


@check("node.step.next-start", M + "§5.3, §7.2", "a Step whose next[0] does not start at the session's end: INVALID_FIELD")
async def step_next_start(ctx):
    info = await ctx.node_info()
    if info.end + 2 > MAX_BLOCKS:
        raise NotApplicable("the node serves up to MAX_BLOCKS")
    hop = Hop(peer_id=Identity.generate().peer_id, session_id=os.urandom(16), start=info.end + 1, end=info.end + 2)
    await _bad_step(ctx, lambda s: s.step(next=(hop,)), ErrorCode.INVALID_FIELD, "a chain with a gap after this node")


@check("node.step.non-finite", M + "§7.3", "NaN in a Step's hidden: NON_FINITE; the session is unchanged")
async def step_nan(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        await s.good_step(1)
        data = encode_message(s.step(hidden=_h(s.info, value=1.5)), "f32").replace(b"\x00\x00\xc0\x3f", b"\x00\x00\xc0\x7f", 1)
        reply, raw, sent = await s.exchange(data)
        expect_error(reply, ErrorCode.NON_FINITE, sent=sent, raw=raw)
        s.step_id += 1
        await s.good_step(1, "a valid Step after a NaN step")
    finally:
        await s.close()


@check("node.step.duplicate", M + "§5.7", "a Step with a step_id already processed is not run and gets no reply")
async def step_duplicate(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        await s.good_step(1)
        dup = s.step(step_id=s.step_id - 1)  # same step_id, at the next position: would run if not a duplicate
        await s.send(dup)
        got = await _quiet(s)
        if got is not None:
            raise Failed("a duplicate Step was answered", sent=dup, received=got)
        await s.good_step(1, "the next Step after a duplicate (the duplicate must not have moved the cache)")
    finally:
        await s.close()


@check("node.session.bad-input-keeps-stream", M + "§2.6", "invalid payloads on a session stream get Errors; the stream and session keep serving")
async def session_bad_input(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        await s.good_step(1)
        for data, code in ((b"\xc1", ErrorCode.MALFORMED), (msgpack.packb({0: PROTOCOL_VERSION + 1, 1: 5, 2: {}}), ErrorCode.UNSUPPORTED_VERSION),
                           (msgpack.packb({0: PROTOCOL_VERSION, 1: 99, 2: {}}), ErrorCode.UNKNOWN_MESSAGE)):
            reply, raw, sent = await s.exchange(data)
            expect_error(reply, code, sent=sent, raw=raw)
        await s.good_step(1, "a valid Step after invalid payloads")
    finally:
        await s.close()


@check("node.session.failure-isolated", M + "§5.9", "a step that fails fails alone: another session's concurrent step and cache are unaffected")
async def session_failure_isolated(ctx):
    a = await Session.opened_ok(ctx, max_length=8)
    b = await Session.opened_ok(ctx, max_length=8)
    try:
        await a.good_step(1)
        await b.good_step(1)
        bad = a.step(hidden=_h(a.info, hidden=a.info.hidden_size + 1))
        (reply, raw, sent), _ = await asyncio.gather(a.exchange(bad), b.good_step(1, "a step running beside another session's failing one"))
        expect_error(reply, ErrorCode.HIDDEN_SIZE_MISMATCH, sent=sent, raw=raw)
        a.step_id += 1
        await a.good_step(1, "the failed session's next step")
        await b.good_step(1, "the other session's next step")
    finally:
        await a.close()
        await b.close()


@check("node.session.unexpected-messages", M + "§2.1", "NodeInfoRequest, OpenSession or Push on a session stream: UNKNOWN_MESSAGE")
async def session_unexpected(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        info = s.info
        for msg in (NodeInfoRequest(),
                    OpenSession(model=info.model, start=info.start, end=info.end, max_length=8, batch_size=1, codec="f32"),
                    Push(session_id=s.sid, step_id=50, position=0, hidden=_h(info))):
            reply, raw, sent = await s.exchange(msg)
            expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=sent, raw=raw)
        await s.good_step(1, "a valid Step after unexpected messages")
    finally:
        await s.close()


@check("node.close", M + "§5.8, §5.9", "CloseSession: SessionClosed, then the session is unknown (a Push for it: UNKNOWN_SESSION)")
async def close_session(ctx):
    s = await Session.opened_ok(ctx)
    await s.good_step(1)
    reply, raw, sent = await s.exchange(CloseSession(session_id=s.sid))
    if not isinstance(reply, SessionClosed) or reply.session_id != s.sid:
        raise Failed("expected SessionClosed with the session id", sent=sent, received=reply)
    await _stream_ends(s, "SessionClosed")
    data = encode_message(Push(session_id=s.sid, step_id=9, position=1, hidden=_h(s.info)))
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=data, raw=raw)


@check("node.close.unknown", M + "§5.8", "CloseSession for a session not open: UNKNOWN_SESSION")
async def close_unknown(ctx):
    s = await Session.opened_ok(ctx)
    try:
        reply, raw, sent = await s.exchange(CloseSession(session_id=os.urandom(16)))
        expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=sent, raw=raw)
    finally:
        await s.close()


# ----------------------------------------------------------------------------- push


@check("node.push.ack", M + "§5.7", "a Push for an open session: PushAck (session, step_id), then its StepResult on the session stream")
async def push_ack(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        msg = Push(session_id=s.sid, step_id=0, position=0, hidden=_h(s.info))
        data = encode_message(msg)
        reply, raw = await request(ctx, data)
        if not isinstance(reply, PushAck) or reply.session_id != s.sid or reply.step_id != 0:
            raise Failed("expected PushAck for the session and step 0", sent=data, received=reply)
        result, raw = await s.receive()
        if not isinstance(result, StepResult) or result.step_id != 0:
            raise Failed("the pushed step's StepResult did not arrive on the session stream", received=result)
        s.step_id, s.position = 1, 1
        await s.good_step(1, "a Step after a pushed one")
    finally:
        await s.close()


@check("node.push.duplicate", M + "§5.7", "a duplicate Push is acknowledged (PushAck) and not run")
async def push_duplicate(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        await s.good_step(1)
        data = encode_message(Push(session_id=s.sid, step_id=0, position=1, hidden=_h(s.info)))
        reply, raw = await request(ctx, data)
        if not isinstance(reply, PushAck) or reply.step_id != 0:
            raise Failed("a duplicate Push was not answered PushAck", sent=data, received=reply)
        got = await _quiet(s)
        if got is not None:
            raise Failed("a duplicate Push was run (a reply arrived on the session stream)", sent=data, received=got)
        await s.good_step(1, "the next Step after a duplicate Push")
    finally:
        await s.close()


@check("node.push.ids-count", M + "§5.7", "a pushed step_id counts on its session: a Step sent directly afterwards "
       "with the same id is a duplicate (no reply), one with a higher id runs")
async def push_ids_count(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    try:
        data = encode_message(Push(session_id=s.sid, step_id=5, position=0, hidden=_h(s.info)))
        reply, raw = await request(ctx, data)
        if not isinstance(reply, PushAck) or reply.step_id != 5:
            raise Failed("a valid Push was not answered PushAck", sent=data, received=reply)
        result, raw = await s.receive()
        if not isinstance(result, StepResult) or result.step_id != 5:
            raise Failed("the pushed step's StepResult did not arrive on the session stream", sent=data, received=result)
        sent = await s.send(s.step(1, step_id=5, position=1))
        got = await _quiet(s)
        if got is not None:
            raise Failed("a Step reusing a pushed step_id was answered (it is a duplicate, §5.7)", sent=sent, received=got)
        s.step_id, s.position = 6, 1
        await s.good_step(1, "a Step with an id above the pushed one")
    finally:
        await s.close()


# ----------------------------------------------------------------------------- chain binding (§5.10)


@check("node.open.upstream-echo", M + "§5.2, §5.10", "SessionOpened names the upstream the OpenSession named, and none when none")
async def open_upstream_echo(ctx):
    other = Identity.generate().peer_id
    named = await Session.opened_ok(ctx, upstream=other)
    unnamed = await Session.opened_ok(ctx, upstream=None)
    try:
        if named.opened.upstream != other or unnamed.opened.upstream is not None:
            raise Failed(f"SessionOpened upstream {named.opened.upstream} / {unnamed.opened.upstream}: expected "
                         f"{other} / absent", received=(named.opened, unnamed.opened))
    finally:
        await named.close()
        await unnamed.close()


async def _forbidden_pushes(ctx, s: Session, host, pushes, what: str):
    """Each push from ``host`` is answered FORBIDDEN with its step_id, nothing reaches the owner, and the
    session still takes its next Step at the position it held (§5.10: a refused Push changes nothing)."""
    for push in pushes:
        data = encode_message(push)
        raw = await host.call(ctx.addr, NODE_PROTOCOL, data, timeout=10)
        expect_error(_decode(raw, data), ErrorCode.FORBIDDEN, sent=data, step_id=push.step_id, raw=raw)
    got = await _quiet(s)
    if got is not None:
        raise Failed(f"a refused Push ({what}) sent something to the session's owner", received=got)
    await s.good_step(1, f"the owner's Step after refused pushes ({what}): the session must be unchanged")


@check("node.push.forbidden", M + "§5.10", "Pushes from a peer that is not the session's upstream (another key holder: "
       "the owner's next position, a push naming itself as next hop, step_id 2^64-1, a wrong position): FORBIDDEN "
       "each, nothing sent to the owner, the session unchanged", timeout=60)
async def push_forbidden(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    insider = await ctx.new_host()
    try:
        await s.good_step(1)
        info = s.info
        hop = None
        if info.end < MAX_BLOCKS:
            hop = Hop(peer_id=insider.peer_id, session_id=os.urandom(16), start=info.end, end=info.end + 1)
        h = _h(info)
        pushes = [Push(session_id=s.sid, step_id=s.step_id, position=s.position, hidden=h),
                  Push(session_id=s.sid, step_id=2**64 - 1, position=s.position, hidden=h),
                  Push(session_id=s.sid, step_id=s.step_id + 1, position=s.position + 3, hidden=h)]
        if hop is not None:
            pushes.insert(1, Push(session_id=s.sid, step_id=s.step_id, position=s.position, hidden=h, next=(hop,)))
        await _forbidden_pushes(ctx, s, insider, pushes, "from another key holder")
    finally:
        await s.close()
        await ctx.close_host(insider)


@check("node.session.other-stream", M + "§5.10, §5.3, §5.8", "Step, SetUpstream and CloseSession naming a session on "
       "another session's stream (another client's): UNKNOWN_SESSION each; that session still serves its owner")
async def session_other_stream(ctx):
    victim = await Session.opened_ok(ctx, max_length=8)
    insider = await ctx.new_host()
    other = await Session.opened_ok(ctx, host=insider, max_length=8)
    try:
        await victim.good_step(1)
        for msg in (other.step(session_id=victim.sid, step_id=2**64 - 1, position=victim.position),
                    SetUpstream(session_id=victim.sid, upstream=insider.peer_id),
                    CloseSession(session_id=victim.sid)):
            reply, raw, sent = await other.exchange(msg)
            expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=sent, raw=raw)
        got = await _quiet(victim)
        if got is not None:
            raise Failed("another client's messages sent something to the session's owner", received=got)
        await victim.good_step(1, "the owner's Step after another client named its session")
    finally:
        await victim.close()
        await other.close()
        await ctx.close_host(insider)


@check("node.push.no-upstream", M + "§5.10", "a session opened without upstream accepts no Push, even from its owner's peer")
async def push_no_upstream(ctx):
    s = await Session.opened_ok(ctx, max_length=8, upstream=None)
    try:
        push = Push(session_id=s.sid, step_id=0, position=0, hidden=_h(s.info))
        await _forbidden_pushes(ctx, s, await ctx.host(), [push], "into a session without upstream")
    finally:
        await s.close()


@check("node.push.set-upstream", M + "§5.10", "SetUpstream moves the binding: the old upstream's Push is FORBIDDEN, "
       "the new one's is acknowledged and runs; SetUpstream gets no reply", timeout=60)
async def push_set_upstream(ctx):
    s = await Session.opened_ok(ctx, max_length=8)
    new = await ctx.new_host()
    try:
        await s.send(SetUpstream(session_id=s.sid, upstream=new.peer_id))
        old_push = Push(session_id=s.sid, step_id=0, position=0, hidden=_h(s.info))
        await _forbidden_pushes(ctx, s, await ctx.host(), [old_push], "from the upstream replaced by SetUpstream")
        msg = Push(session_id=s.sid, step_id=s.step_id, position=s.position, hidden=_h(s.info))
        data = encode_message(msg)
        raw = await new.call(ctx.addr, NODE_PROTOCOL, data, timeout=10)
        reply = _decode(raw, data)
        if not isinstance(reply, PushAck) or reply.step_id != msg.step_id:
            raise Failed("a Push from the upstream named by SetUpstream was not acknowledged", sent=data, received=reply)
        result, raw = await s.receive()
        if not isinstance(result, StepResult) or result.step_id != msg.step_id:
            raise Failed("the new upstream's pushed step did not reach the owner", sent=data, received=result)
    finally:
        await s.close()
        await ctx.close_host(new)


@check("node.push.unknown-session", M + "§5.7, §5.9", "a Push for a session never opened: UNKNOWN_SESSION")
async def push_unknown(ctx):
    info = await ctx.node_info()
    data = encode_message(Push(session_id=os.urandom(16), step_id=0, position=0, hidden=_h(info)))
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=data, raw=raw)


# ----------------------------------------------------------------------------- lifetime


async def _tokens_left(ctx) -> int:
    reply, raw = await request(ctx, encode_message(NodeInfoRequest()))
    if not isinstance(reply, NodeInfo):
        raise Failed("NodeInfoRequest not answered NodeInfo", received=reply)
    return reply.cache_tokens_left


@check("node.lifetime.disconnect", M + "§5.9", "a client that disconnects mid-session has its cache freed", timeout=30)
async def lifetime_disconnect(ctx):
    before = await _tokens_left(ctx)
    host = await ctx.new_host()
    s = await Session.opened_ok(ctx, host=host, max_length=8, batch_size=2)
    held = await _tokens_left(ctx)
    await ctx.close_host(host)
    loop = asyncio.get_running_loop()
    end = loop.time() + 15
    while (left := await _tokens_left(ctx)) != before and loop.time() < end:
        await asyncio.sleep(0.2)
    if left != before:
        raise Failed(f"cache_tokens_left {left} 15 s after the disconnect, {before} before the session ({held} while open)")
    return f"{before} -> {held} -> {left}"


async def _stream_ends(s: Session, after: str) -> None:
    """The node closes the session stream after ``after`` (§5.8, §5.9): no message, then its end."""
    try:
        extra, raw = await s.receive(5)
    except EndOfStream:
        return
    except TimeoutError:
        raise Failed(f"the session stream is still open 5 s after {after}") from None
    raise Failed(f"a message after {after}; the node closes the stream", received=extra)


@check("node.lifetime.idle-timeout", M + "§5.9", "an idle session gets Error TIMEOUT after idle_timeout, then is unknown", timeout=60)
async def lifetime_idle(ctx):
    s = await Session.opened_ok(ctx)
    idle = s.opened.idle_timeout
    if idle > ctx.max_idle_wait:
        await s.close()
        raise NotApplicable(f"idle_timeout {idle:g} s is over --max-idle-wait {ctx.max_idle_wait:g} s")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        reply, raw = await s.receive(idle + 10)
    except TimeoutError:
        raise Failed(f"no Error TIMEOUT within idle_timeout {idle:g} s + 10 s") from None
    waited = loop.time() - t0
    expect_error(reply, ErrorCode.TIMEOUT, raw=raw)
    if waited < idle * 0.9:
        raise Failed(f"TIMEOUT after {waited:.1f} s, before idle_timeout {idle:g} s")
    await _stream_ends(s, "Error TIMEOUT")
    data = encode_message(Push(session_id=s.sid, step_id=0, position=0, hidden=_h(s.info)))
    reply, raw = await request(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=data, raw=raw)
    return f"TIMEOUT after {waited:.1f} s (idle_timeout {idle:g} s)"


# ----------------------------------------------------------------------------- forward / backward


@check("node.forward.ok", M + "§6.1, §8", "a valid Forward: ForwardResult of the input's shape, in the requested codec")
async def forward_ok(ctx):
    info = await ctx.node_info()
    msg = Forward(model=info.model, start=info.start, end=info.end, codec="f16", hidden=_h(info, 3))
    data = encode_message(msg)
    reply, raw = await request(ctx, data, timeout=30)
    if not isinstance(reply, ForwardResult) or tuple(reply.hidden.shape) != (1, 3, info.hidden_size):
        raise Failed("expected ForwardResult [1, 3, hidden]", sent=data, received=reply)
    if _reply_codec(raw, 0) != "f16":
        raise Failed(f"ForwardResult in codec {_reply_codec(raw, 0)!r}, the request named 'f16'", received=raw)


async def _forward_error(ctx, code, **change):
    info = await ctx.node_info()
    args = dict(model=info.model, start=info.start, end=info.end, codec="f32", hidden=_h(info))
    args.update({k: v(info) for k, v in change.items()})
    data = encode_message(Forward(**args))
    reply, raw = await request(ctx, data)
    expect_error(reply, code, sent=data, raw=raw)


@check("node.forward.model-mismatch", M + "§6.1", "Forward naming another model: MODEL_MISMATCH")
async def forward_model(ctx):
    await _forward_error(ctx, ErrorCode.MODEL_MISMATCH, model=lambda i: i.model + ".other")


@check("node.forward.blocks-not-served", M + "§6.1", "Forward for blocks outside the node's span: BLOCKS_NOT_SERVED")
async def forward_blocks(ctx):
    if (await ctx.node_info()).end >= MAX_BLOCKS:
        raise NotApplicable("the node serves up to MAX_BLOCKS")
    await _forward_error(ctx, ErrorCode.BLOCKS_NOT_SERVED, start=lambda i: i.end, end=lambda i: i.end + 1)


@check("node.forward.hidden-size", M + "§6.1", "Forward with a wrong hidden dimension: HIDDEN_SIZE_MISMATCH")
async def forward_hidden(ctx):
    await _forward_error(ctx, ErrorCode.HIDDEN_SIZE_MISMATCH, hidden=lambda i: _h(i, hidden=i.hidden_size + 1))


@check("node.backward.ok", M + "§6.2", "a valid Backward: BackwardResult with grad_inputs of the input's shape, in the requested codec")
async def backward_ok(ctx):
    info = await ctx.node_info()
    msg = Backward(model=info.model, start=info.start, end=info.end, codec="f32", hidden=_h(info, 2), grad_outputs=_h(info, 2, value=0.01))
    data = encode_message(msg)
    reply, raw = await request(ctx, data, timeout=30)
    if not isinstance(reply, BackwardResult) or tuple(reply.grad_inputs.shape) != (1, 2, info.hidden_size):
        raise Failed("expected BackwardResult with grad_inputs [1, 2, hidden]", sent=data, received=reply)
    if reply.grad_prompts is not None:
        raise Failed("grad_prompts sent for a request without prompts (§6.2)", received=reply)
    if _reply_codec(raw, 0) != "f32":
        raise Failed(f"BackwardResult in codec {_reply_codec(raw, 0)!r}, the request named 'f32'", received=raw)


@check("node.still-serves", M + "§2.6", "after every bad request above, the node still opens a session and computes")
async def still_serves(ctx):
    s = await Session.opened_ok(ctx)
    try:
        await s.good_step(2)
    finally:
        await s.close()
