"""One inference session stream on one node, over blocks ``[start, end)`` (spec/messages.md §5).

A thin asyncio driver: ``SpanSession`` opens the stream (``OpenSession`` ->
``SessionOpened``, §5.1), sends ``Step``s (§5.3) and ``KeepAlive``s (§5.9.1, only where
its ``SessionOpened`` advertised them), closes (``CloseSession``, §5.8) or abandons it,
and a reader task hands every message the node sends on the stream (``StepResult``s of steps we sent *and* of steps pushed to the node, §5.7;
an ``Error``; the stream's end) to ``on_event(session, event)``: a
``StepResult`` or a ``PeerFailure``. What a result means (was it asked for, is
it the right shape, what to replay) is decided by the chain state,
client/chain.py.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import torch

from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.messages import (
    CloseSession,
    Error,
    Hop,
    KeepAlive,
    OpenSession,
    SessionClosed,
    SessionOpened,
    SetUpstream,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from biopetals.transport import addresses
from biopetals.transport.errors import EndOfStream
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

from .errors import PeerFailure, describe_code, peer_failure_from
from .routing import ServerSpan

__all__ = ["SpanSession", "dial_target"]

# what the reader reports: a StepResult the node sent, or the failure that ended the session
EventHandler = Callable[["SpanSession", "StepResult | PeerFailure"], None]


def dial_target(server: ServerSpan) -> str:
    """What to dial for ``server``: the swarm's dial rule (transport/addresses.py) on its announcement."""
    return addresses.dial_target(server.peer_id, server.addrs)


class SpanSession:
    """A session for blocks ``[start, end)`` on ``server``. Create with ``await SpanSession.open(...)``."""

    def __init__(self, server: ServerSpan, start: int, end: int, stream: Stream, session_id: bytes,
                 idle_timeout: float, codec: str, on_event: EventHandler) -> None:
        self.server = server
        self.start = start
        self.end = end
        self.stream = stream
        self.session_id = session_id
        self.idle_timeout = idle_timeout
        self.codec = codec
        self.rollback = False  # the node accepts ``Step.truncate`` (its SessionOpened said so, §5.6.1)
        self.keepalive = False  # the node accepts ``KeepAlive`` (its SessionOpened said so, §5.9.1)
        self._on_event = on_event
        self._ended = False
        self._send_lock = asyncio.Lock()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def __repr__(self) -> str:
        return f"<SpanSession {self.peer_id[:12]}… [{self.start}, {self.end})>"

    @classmethod
    async def open(cls, host: Host, server: ServerSpan, start: int, end: int, *, model: str, max_length: int,
                   batch_size: int, codec: str, timeout: float, on_event: EventHandler,
                   adapter: str | None = None, upstream: str | None = None) -> "SpanSession":
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
        session = cls(server, start, end, stream, reply.session_id, reply.idle_timeout, codec, on_event)
        session.rollback = reply.rollback == 1
        session.keepalive = reply.keepalive == 1
        return session

    def hop(self) -> Hop:
        """This session as a hop of a push chain (§5.4)."""
        return Hop(peer_id=self.peer_id, session_id=self.session_id, start=self.start, end=self.end,
                   addrs=tuple(self.server.addrs[:16]))

    async def send_step(self, step_id: int, position: int, hidden: torch.Tensor, hops: tuple[Hop, ...] = (),
                        mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None,
                        truncate: bool = False) -> None:
        """Send one ``Step`` (§5.3); ``prompts``: deep prompts for this span's blocks followed by the hops'.
        ``truncate``: the node first cuts its cache to ``position`` (§5.6.1).
        Raises ``PeerFailure`` (``local`` when our own encoder refuses the message)."""
        message = Step(session_id=self.session_id, step_id=step_id, position=position, hidden=hidden, next=hops,
                       mask=mask, prompts=prompts, truncate=1 if truncate else None)
        try:
            data = encode_message(message, self.codec)
            async with self._send_lock:
                await self.stream.send(data)
        except Exception as exc:
            raise peer_failure_from(self.peer_id, exc) from exc

    async def set_upstream(self, peer_id: str | None) -> None:
        """Name the node that pushes into this session from now on (§5.10: ``SetUpstream``, no reply).
        Raises ``PeerFailure``."""
        try:
            async with self._send_lock:
                await self.stream.send(encode_message(SetUpstream(session_id=self.session_id, upstream=peer_id)))
        except Exception as exc:
            raise peer_failure_from(self.peer_id, exc) from exc

    async def keep_alive(self) -> None:
        """Restart the node's idle clock of this session (§5.9.1: ``KeepAlive``, no reply); only for a
        session whose ``SessionOpened`` advertised it. Raises ``PeerFailure``."""
        if not self.keepalive:
            raise RuntimeError(f"{self!r}: its SessionOpened did not advertise keepalive (spec/messages.md §5.9.1)")
        try:
            async with self._send_lock:
                await self.stream.send(encode_message(KeepAlive(session_id=self.session_id)))
        except Exception as exc:
            raise peer_failure_from(self.peer_id, exc) from exc

    # ------------------------------------------------------------------ reader

    async def _read(self) -> None:
        try:
            while True:
                try:
                    data = await self.stream.receive()
                except EndOfStream:
                    self._end(PeerFailure(self.peer_id, "the node closed the session stream",
                                          int(ErrorCode.CONNECTION_CLOSED)))
                    return
                message = decode_message(data, expected=(StepResult, Error, SessionClosed))
                if isinstance(message, StepResult):
                    if message.session_id != self.session_id:
                        raise ProtocolError(ErrorCode.INVALID_FIELD, "StepResult for another session")
                    self._on_event(self, message)
                elif isinstance(message, Error):
                    # a failed step leaves the session as it was (§2.6), but the chain treats the
                    # node as failed for this session and replaces it
                    self._end(PeerFailure(self.peer_id, f"{describe_code(message.code)}: {message.message}",
                                          int(message.code)))
                    return
                else:  # SessionClosed
                    self._end(PeerFailure(self.peer_id, "session closed", int(ErrorCode.UNKNOWN_SESSION)))
                    return
        except asyncio.CancelledError:
            self._ended = True
            raise
        except Exception as exc:
            self._end(peer_failure_from(self.peer_id, exc))

    def _end(self, failure: PeerFailure) -> None:
        if not self._ended:
            self._ended = True
            self._on_event(self, failure)

    async def close(self, timeout: float = 2.0) -> None:
        """Close politely (``CloseSession``) if alive; never raises."""
        if not self._ended:
            self._ended = True  # what the node says now is no news to anyone
            try:
                async with asyncio.timeout(timeout):
                    async with self._send_lock:
                        await self.stream.send(encode_message(CloseSession(session_id=self.session_id)))
                    # the reader sees SessionClosed (or the stream end) and stops
                    await asyncio.wait([self._reader], timeout=timeout)
            except Exception:
                pass
        self.abandon()

    def abandon(self) -> None:
        """Drop the session without a word (the node failed); the node frees it when the stream closes."""
        self._ended = True
        if not self._reader.done():
            self._reader.cancel()
        if not self.stream.is_closed:
            self.stream.reset(ErrorCode.CONNECTION_CLOSED, "session abandoned by the client")
