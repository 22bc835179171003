"""One inference session on one node, over blocks ``[start, end)`` (spec/messages.md §5).

A ``SpanSession`` owns one session stream: ``OpenSession`` -> ``SessionOpened``,
then ``Step``s, then ``CloseSession``. A reader task takes every message the node
sends on the stream (``StepResult``s of steps we sent *and* of steps that reached
the node by server-to-server push, §5.7) and resolves the waiter for that
``step_id``. Any failure (stream or connection lost, an ``Error`` without
``step_id``, an invalid message) fails every waiter with a ``PeerFailure`` and
marks the session dead.

``history`` is what the session was fed: ``(step_id, position, hidden, mask, prompts)`` for each
step whose result arrived, in order. It is the client's copy of the inputs that
rebuild this span's KV cache on a replacement node (§5.9).

Step ids: the chain uses ``position + 1`` of the step's first token as its
``step_id`` on every session. Ids then strictly increase within each session
(§5.7), a retry of the same step is recognised by the node as a duplicate, and a
replacement session replays history under the very same ids.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import torch

from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.messages import (
    CloseSession,
    Error,
    Hop,
    OpenSession,
    SessionClosed,
    SessionOpened,
    SetUpstream,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.transport.errors import EndOfStream
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

from .errors import PeerFailure, describe_code, peer_failure_from
from .routing import ServerSpan

__all__ = ["SpanSession", "dial_target"]

log = logging.getLogger("biopetals.client")


def dial_target(server: ServerSpan) -> str:
    """What to dial for ``server``: its first announced multiaddr with /p2p/, else its peer id."""
    for addr in server.addrs:
        try:
            parsed = Multiaddr.parse(addr)
        except ValueError:
            continue
        if parsed.peer_id is None:
            return f"{parsed}/p2p/{server.peer_id}"
        return str(parsed)
    return server.peer_id


def _mark_retrieved(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


@dataclass
class _Fed:
    step_id: int
    position: int
    hidden: torch.Tensor
    mask: torch.Tensor | None = None  # padding mask of the step's tokens (spec/messages.md §8.1)
    prompts: torch.Tensor | None = None  # deep prompts of this span's blocks (§5.3)


class SpanSession:
    """A session for blocks ``[start, end)`` on ``server``. Create with ``await SpanSession.open(...)``."""

    def __init__(self, server: ServerSpan, start: int, end: int, stream: Stream, session_id: bytes,
                 idle_timeout: float, batch_size: int, max_length: int, codec: str) -> None:
        self.server = server
        self.codec = codec
        self.start = start
        self.end = end
        self.stream = stream
        self.session_id = session_id
        self.idle_timeout = idle_timeout
        self.batch_size = batch_size
        self.max_length = max_length
        self.position = 0  # tokens in the node's cache, as far as we know
        self.history: list[_Fed] = []
        self._waiters: dict[int, asyncio.Future[torch.Tensor]] = {}
        self._results: dict[int, torch.Tensor] = {}  # results that arrived before anyone waited
        self._failure: PeerFailure | None = None
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    @property
    def dead(self) -> bool:
        return self._failure is not None

    def __repr__(self) -> str:
        return f"<SpanSession {self.peer_id[:12]}… [{self.start}, {self.end}) pos={self.position}>"

    @classmethod
    async def open(cls, host: Host, server: ServerSpan, start: int, end: int, *, model: str, max_length: int,
                   batch_size: int, codec: str, timeout: float, adapter: str | None = None,
                   upstream: str | None = None) -> "SpanSession":
        """Open a session stream and the session (§5.1); raises ``PeerFailure`` on any failure.

        ``upstream``: the peer id of the node that will push into it (§5.10), None: nobody."""
        session_id = secrets.token_bytes(16)
        stream = None
        try:
            async with asyncio.timeout(timeout):
                stream = await host.open_stream(dial_target(server), PROTOCOL_NAME, timeout=timeout)
                request = OpenSession(model=model, start=start, end=end, max_length=max_length,
                                      batch_size=batch_size, codec=codec, session_id=session_id, adapter=adapter,
                                      upstream=upstream)
                await stream.send(encode_message(request))
                reply = decode_message(await stream.receive(), expected=(SessionOpened, Error))
        except BaseException as exc:
            if stream is not None and not stream.is_closed:
                stream.reset(ErrorCode.CONNECTION_CLOSED, "client gave up opening the session")
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise peer_failure_from(server.peer_id, exc) from exc
        if isinstance(reply, Error):
            stream.reset(ErrorCode.CONNECTION_CLOSED, "session refused")
            raise PeerFailure(server.peer_id, f"refused the session: {describe_code(reply.code)}: {reply.message}",
                              int(reply.code))
        if reply.upstream != request.upstream:  # §5.10: the node must bind what we named
            stream.reset(ErrorCode.CONNECTION_CLOSED, "session not bound to its upstream")
            raise PeerFailure(server.peer_id, f"bound the session to upstream {reply.upstream}, not "
                              f"{request.upstream} (spec/messages.md §5.10)", int(ErrorCode.INVALID_FIELD))
        return cls(server, start, end, stream, reply.session_id, reply.idle_timeout, batch_size, max_length, codec)

    # ------------------------------------------------------------------ steps

    def hop(self) -> Hop:
        """This session as a hop of a push chain (§5.4)."""
        return Hop(peer_id=self.peer_id, session_id=self.session_id, start=self.start, end=self.end,
                   addrs=tuple(self.server.addrs[:16]))

    def expect(self, step_id: int) -> asyncio.Future[torch.Tensor]:
        """The future of the result of ``step_id`` (sent by us or pushed to the node)."""
        fut = self._waiters.get(step_id)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            # a failure set on a result nobody waits for any more (the chain replaced a span
            # before it) is not an error to log: whoever awaits the future still gets it
            fut.add_done_callback(_mark_retrieved)
            if step_id in self._results:
                fut.set_result(self._results.pop(step_id))
            elif self._failure is not None:
                fut.set_exception(self._failure)
                fut.exception()  # retrieved: the caller may never await it (its send fails first)
            self._waiters[step_id] = fut
        return fut

    async def send_step(self, step_id: int, position: int, hidden: torch.Tensor, hops: tuple[Hop, ...] = (),
                        mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> None:
        """``prompts``: deep prompts for this span's blocks followed by the hops' (§5.3)."""
        if self._failure is not None:
            raise self._failure
        message = Step(session_id=self.session_id, step_id=step_id, position=position, hidden=hidden, next=hops,
                       mask=mask, prompts=prompts)
        data = encode_message(message, self.codec)
        try:
            async with self._send_lock:
                await self.stream.send(data)
        except Exception as exc:
            failure = peer_failure_from(self.peer_id, exc)
            self._fail(failure)
            raise failure from exc

    async def set_upstream(self, peer_id: str | None) -> None:
        """Name the node that pushes into this session from now on (§5.10: ``SetUpstream``, no reply)."""
        if self._failure is not None:
            raise self._failure
        try:
            async with self._send_lock:
                await self.stream.send(encode_message(SetUpstream(session_id=self.session_id, upstream=peer_id)))
        except Exception as exc:
            failure = peer_failure_from(self.peer_id, exc)
            self._fail(failure)
            raise failure from exc

    def record(self, step_id: int, position: int, hidden: torch.Tensor, mask: torch.Tensor | None = None,
               prompts: torch.Tensor | None = None) -> None:
        """The node processed ``hidden`` (with padding ``mask`` and this span's ``prompts``) at ``position``:
        remember it for a replay."""
        self.history.append(_Fed(step_id, position, hidden, mask, prompts))
        self.position = position + int(hidden.shape[1])

    def forget(self, step_id: int) -> None:
        fut = self._waiters.pop(step_id, None)
        if fut is not None and not fut.done():
            fut.cancel()
        self._results.pop(step_id, None)

    async def run_step(self, step_id: int, position: int, hidden: torch.Tensor, timeout: float,
                       mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Send one step directly (no push) and wait for its result, all within ``timeout``; records it."""
        fut = self.expect(step_id)
        try:
            async with asyncio.timeout(timeout):  # the send too: a stalled node stops reading
                await self.send_step(step_id, position, hidden, mask=mask, prompts=prompts)
                out = await asyncio.shield(fut)
        except TimeoutError:
            failure = PeerFailure(self.peer_id, f"no result for step {step_id} within {timeout:.1f} s", int(ErrorCode.TIMEOUT))
            raise failure from None
        finally:
            self._waiters.pop(step_id, None)
        self.record(step_id, position, hidden, mask, prompts)
        return out

    # ------------------------------------------------------------------ reader

    async def _read(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive()
                except EndOfStream:
                    self._fail(PeerFailure(self.peer_id, "the node closed the session stream", int(ErrorCode.CONNECTION_CLOSED)))
                    return
                message = decode_message(data, expected=(StepResult, Error, SessionClosed))
                if isinstance(message, StepResult):
                    if message.session_id != self.session_id:
                        raise ProtocolError(ErrorCode.INVALID_FIELD, "StepResult for another session")
                    fut = self._waiters.get(message.step_id)
                    if fut is None:
                        self._results[message.step_id] = message.hidden
                    elif not fut.done():
                        fut.set_result(message.hidden)
                elif isinstance(message, Error):
                    failure = PeerFailure(self.peer_id, f"{describe_code(message.code)}: {message.message}", int(message.code))
                    fut = self._waiters.get(message.step_id) if message.step_id is not None else None
                    if fut is not None:
                        # a failed step leaves the session as it was (§2.6), but we treat the
                        # node as failed for this session: the chain replaces it.
                        if not fut.done():
                            fut.set_exception(failure)
                    self._fail(failure)
                    return
                else:  # SessionClosed
                    self._fail(PeerFailure(self.peer_id, "session closed", int(ErrorCode.UNKNOWN_SESSION)))
                    return
        except asyncio.CancelledError:
            self._fail(PeerFailure(self.peer_id, "session closed by the client"))
            raise
        except Exception as exc:
            self._fail(peer_failure_from(self.peer_id, exc))

    def _fail(self, failure: PeerFailure) -> None:
        if self._failure is None:
            self._failure = failure
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(failure)
                fut.exception()  # retrieved: nobody may wait on it any more

    async def close(self, timeout: float = 2.0) -> None:
        """Close politely (``CloseSession``) if alive; never raises."""
        if self._failure is None:
            try:
                async with asyncio.timeout(timeout):
                    async with self._send_lock:
                        await self.stream.send(encode_message(CloseSession(session_id=self.session_id)))
                    # the reader sees SessionClosed (or the stream end) and stops
                    await asyncio.wait([self._reader], timeout=timeout)
            except Exception:
                pass
        self._fail(PeerFailure(self.peer_id, "session closed by the client"))
        if not self._reader.done():
            self._reader.cancel()
        if not self.stream.is_closed:
            self.stream.reset(ErrorCode.CONNECTION_CLOSED, "session closed")

    def abandon(self) -> None:
        """Drop the session without a word (the node failed); the node frees it when the stream closes."""
        self._fail(PeerFailure(self.peer_id, "abandoned"))
        if not self._reader.done():
            self._reader.cancel()
        if not self.stream.is_closed:
            self.stream.reset(ErrorCode.CONNECTION_CLOSED, "session abandoned by the client")
