"""``Stream``: one multiplexed stream of messages, with backpressure both ways.

See spec/transport.md §3.5 (streams) and §3.10 (messages on a stream). A stream
carries *messages*: each is framed as in spec/tensors.md §6 (a 4-byte big-endian
length, then 1 to ``MAX_FRAME_BYTES`` bytes), so the receiver gets exactly what
the sender passed to ``send``.

Backpressure, sending: ``send`` writes no more than the stream's flow-control
window allows and waits (``WindowUpdated``) for the rest, and it waits while the
socket's write buffer is above its high-water mark. A fast writer facing a slow
reader therefore holds at most one window plus one socket buffer of data.

Backpressure, receiving: bytes are *consumed* - and the window granted back to the
sender - only while the application is inside ``receive()`` (assembling the message
it asked for). Data nobody asked for stays buffered (at most one window) and stops
the writer; the stream is never reset for being slow.

Unary mode (§3.11, the hot path of ``Host.call`` and of unary handlers, inline or async): a stream
with ``_unary`` set consumes data on arrival like a waiting ``receive()`` and, once
exactly one message and the FIN are in, hands the message to ``_unary.complete``
right inside the receive path - no task, no future of its own, no extra loop turn.
Anything else (a second message, FIN inside or before the message) resets the
stream with MALFORMED and reports a RemoteProtocolError, as ``receive_only`` does.

Streams are made by ``Host.open_stream`` / handed to stream handlers; never directly.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, NoReturn, Protocol

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.framing import (
    AWAITING_ADMISSION,
    BOUNDARY,
    COMPLETE,
    LENGTH_PREFIX_BYTES,
    FrameAssembler,
    frame_prefix,
    whole_frame,
)
from biopetals.protocol.identity import PeerId
from biopetals.protocol.limits import MAX_FRAME_BYTES
from biopetals.protocol.mux import MAX_DATA_PAYLOAD

from .errors import EndOfStream, StreamResetError, TransportError, stream_reset_error
from .link import StreamLink

__all__ = ["Stream", "StreamStatistics", "SEND_BATCH", "retry_budget_waiters"]

#: Most bytes handed to the multiplexer (and the socket) in one step of ``send``:
#: big enough for few Python-level steps per message, small enough that concurrent
#: streams interleave.
SEND_BATCH = 1024 * 1024


class UnaryReceiver(Protocol):
    """Told once what a unary-mode stream received: the one message, or why there is none."""

    def complete(self, stream: Stream, message: bytes) -> None: ...
    def failed(self, stream: Stream, error: BaseException) -> None: ...


@dataclass(frozen=True)
class StreamStatistics:
    stream_id: int
    protocol: str
    messages_sent: int
    messages_received: int
    bytes_sent: int  # payload bytes, without framing
    bytes_received: int  # stream bytes consumed (framing included)
    send_window: int  # bytes we may send before the peer grants more
    receive_buffered: int  # bytes received and not yet consumed by the application
    send_closed: bool
    receive_closed: bool


class Stream:
    """A bidirectional stream of messages to one peer (spec/transport.md §3.5, §3.10).

    ``await send(msg)``, ``await receive()`` (raises ``EndOfStream`` once the peer
    half-closed), ``await send_eof()`` (half-close), ``reset(code, reason)`` (abort),
    ``async for msg in stream``, ``async with stream``. One task may send while
    another receives; two tasks sending (or receiving) at once is an error.
    """

    # One Stream per call: slots make creating it and every attribute access on the hot path cheaper.
    __slots__ = (
        "_conn", "_mux", "stream_id", "protocol", "local", "_pending", "_pending_bytes", "_frames", "_ready",
        "_receiving", "_receive_waiter", "_eof", "_discard", "_sending",
        "_send_closed", "_window_waiter", "_error", "_task_to_cancel", "_unary", "_messages_sent", "_messages_received",
        "_bytes_sent", "_bytes_received", "_reserved", "_budget_wait", "_first_sweep", "_stall", "__weakref__",
    )

    def __init__(self, connection: StreamLink, stream_id: int, protocol: str, *, local: bool) -> None:
        self._conn = connection
        self._mux = connection._mux
        self.stream_id = stream_id
        self.protocol = protocol
        self.local = local  # we opened it
        # receive side
        self._pending: deque[bytes | memoryview] = deque()  # received, not consumed
        self._pending_bytes = 0
        self._frames = FrameAssembler()  # the message being assembled (spec/tensors.md §6): what was consumed of it
        self._ready: bytes | None = None  # a complete message not yet returned
        self._reserved = 0  # bytes of the connection's receive budget held for the message being assembled (§3.16)
        self._budget_wait = False  # the next message's prefix is in; its body waits for budget (§3.16)
        self._first_sweep = 0  # Connection.sweep_first_messages: the sweep that first saw it stalled ...
        self._stall: object = None  # ... and how (stall_marker then)
        self._receiving = False  # a task is inside receive(): data is consumed on arrival
        self._receive_waiter: asyncio.Future[None] | None = None
        self._eof = False  # the peer sent FIN
        self._discard = False  # we closed: incoming data is dropped (and granted back)
        # send side
        self._sending = False
        self._send_closed = False
        self._window_waiter: asyncio.Future[None] | None = None
        # either side
        self._error: TransportError | RemoteProtocolError | None = None
        self._task_to_cancel: asyncio.Task[None] | None = None  # a unary handler working for the peer
        self._unary: UnaryReceiver | None = None  # unary mode (module docstring): told of the one message
        self._messages_sent = self._messages_received = 0
        self._bytes_sent = self._bytes_received = 0

    @property
    def peer_id(self) -> PeerId:
        return self._conn.peer_id

    @property
    def connection(self) -> StreamLink:
        return self._conn

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.protocol} with {self._conn.peer_id}>"

    # ------------------------------------------------------------------ sending

    async def send(self, message: bytes | bytearray | memoryview, *, end: bool = False) -> None:
        """Send one message (1 to MAX_FRAME_BYTES bytes); ``end=True`` half-closes after it.

        Returns once the message is handed to the socket; waits while the peer's
        window is exhausted or the socket buffer is full. ``message`` must not be
        modified until this returns.
        """
        if self._sending:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, f"{self!r}: another task is already sending")
        if self._error is not None or self._send_closed:
            self._check_can_send()
        size = len(message) if type(message) is bytes else memoryview(message).nbytes
        if not 1 <= size <= MAX_FRAME_BYTES:
            raise LocalProtocolError(
                ErrorCode.LIMIT_EXCEEDED if size else ErrorCode.MALFORMED,
                f"a message must be 1 to {MAX_FRAME_BYTES} bytes, got {size} (spec/tensors.md §6)",
            )
        self._sending = True
        try:
            prefix = frame_prefix(size)
            mux, sid, conn = self._mux, self.stream_id, self._conn
            if size <= MAX_DATA_PAYLOAD and mux.send_window(sid) >= size + LENGTH_PREFIX_BYTES:
                # Small message, window open: one frame, one write (the common RPC case).
                mux.send_data(sid, prefix + bytes(message), end_stream=end)
                self._after_send(size, end)
                conn._flush()
                if conn._write_paused:
                    await conn._wait_writable()
                return
            view = memoryview(message).cast("B")
            pieces = (memoryview(prefix), view)
            for index, piece in enumerate(pieces):
                last_piece = index == len(pieces) - 1
                pos, total = 0, len(piece)
                while pos < total:
                    if self._error is not None:
                        raise self._error  # reset or connection lost between two batches
                    window = mux.send_window(sid)
                    if window == 0:
                        await self._wait_window()
                        continue
                    n = min(window, total - pos, SEND_BATCH)
                    final = end and last_piece and pos + n == total
                    mux.send_data(sid, piece[pos : pos + n], end_stream=final)
                    pos += n
                    if final:
                        self._after_send(size, end)
                    conn._flush()
                    if conn._write_paused:
                        await conn._wait_writable()
            if not end:
                self._after_send(size, end)
            conn._flush_now()  # no view of ``message`` may outlive this call
        finally:
            self._sending = False

    def _after_send(self, size: int, end: bool) -> None:
        self._messages_sent += 1
        self._bytes_sent += size
        if end:
            self._send_closed = True
            self._conn._stream_maybe_done(self)

    def _try_send_last(self, message: bytes | bytearray | memoryview) -> bool:
        """Queue ``message`` with FIN now if it fits the send window (no waiting); False if not.

        The unary fast path (§3.11): a call's request, an inline handler's response.
        ``message`` (1 to MAX_FRAME_BYTES bytes, checked by the caller) is referenced
        until the connection's next flush.
        """
        if self._sending or self._error is not None or self._send_closed:
            return False
        size = len(message) if type(message) is bytes else memoryview(message).nbytes
        mux, sid = self._mux, self.stream_id
        prefix = frame_prefix(size)
        if size <= MAX_DATA_PAYLOAD - LENGTH_PREFIX_BYTES:
            # One frame (every small message): header, prefix and message joined once.
            queued = mux.send_last_message(sid, prefix, message, size + LENGTH_PREFIX_BYTES)
            if not queued:
                return False
        else:
            if mux.send_window(sid) < size + LENGTH_PREFIX_BYTES:
                return False
            if size <= MAX_DATA_PAYLOAD:
                mux.send_data(sid, prefix + bytes(message), end_stream=True)  # frames as before: split by the mux
            else:
                mux.send_data(sid, prefix)
                mux.send_data(sid, memoryview(message).cast("B"), end_stream=True)
            queued = 1 if mux.is_open(sid) else 2
        # _after_send(size, True), inline: this runs twice per call
        self._messages_sent += 1
        self._bytes_sent += size
        self._send_closed = True
        conn = self._conn
        if queued == 2:
            conn._drop_stream(self)
        conn._flush()
        return True

    async def send_eof(self) -> None:
        """Half-close: the peer's ``receive`` raises ``EndOfStream`` after our last message.

        Idempotent; we may still receive afterwards.
        """
        if self._send_closed or self._error is not None:
            return
        if self._sending:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, f"{self!r}: send_eof while another task is sending")
        self._mux.end_stream(self.stream_id)
        self._send_closed = True
        self._conn._stream_maybe_done(self)
        self._conn._flush()

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise self._error
        if self._send_closed:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, f"{self!r}: already half-closed for sending")

    async def _wait_window(self) -> None:
        fut = self._window_waiter = self._conn._loop.create_future()
        try:
            await fut
        finally:
            self._window_waiter = None
        if self._error is not None:
            raise self._error

    # ------------------------------------------------------------------ receiving

    async def receive(self) -> bytes:
        """The next message. Raises ``EndOfStream`` after the peer's last one.

        Raises ``StreamResetError`` if the stream was reset (buffered data is
        dropped), ``ConnectionClosedError`` if the connection is gone, and
        ``RemoteProtocolError`` if the peer framed a message wrongly.
        """
        message = await self._next_message()
        if message is None:
            raise EndOfStream(f"stream {self.stream_id} ({self.protocol}): the peer closed its side")
        return message

    async def receive_only(self) -> bytes:
        """Exactly one message, then the end of the stream (a call's request or response, §3.11).

        Anything else resets the stream with MALFORMED and raises RemoteProtocolError.
        """
        message = await self._next_message()
        if message is not None:
            if self._eof and self._error is None and not self._pending and self._ready is None and self._frames.state == BOUNDARY:
                return message  # the end of the stream is already here (a small call): no second pass
            if await self._next_message() is None:
                return message
        why = "no message" if message is None else "more than one message"
        self.reset(ErrorCode.MALFORMED, f"expected exactly one message, got {why} (§3.11)")
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"stream {self.stream_id} ({self.protocol}): peer sent {why}, expected one")

    async def _next_message(self) -> bytes | None:
        """The next message, or None at a clean end of the stream."""
        if self._receiving:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, f"{self!r}: another task is already receiving")
        conn = self._conn
        while True:
            message = self._ready
            if message is not None:
                self._ready = None
                self._messages_received += 1
                return message
            if self._error is not None:
                raise self._error
            if self._pending and self._absorb():
                conn._flush()  # window update for what we just consumed, if one is due
                continue
            conn._flush()
            if self._eof and not self._budget_wait:
                if self._frames.state != BOUNDARY:
                    why = f"{self!r}: peer ended the stream inside a message"
                    self.reset(ErrorCode.MALFORMED, "FIN inside a message (spec/transport.md §3.10)")
                    raise RemoteProtocolError(ErrorCode.MALFORMED, why)
                return None
            fut = self._receive_waiter = conn._loop.create_future()
            self._receiving = True
            try:
                await fut
            finally:
                self._receiving = False
                self._receive_waiter = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while True:
            try:
                yield await self.receive()
            except EndOfStream:
                return

    def _absorb(self) -> bool:
        """Consume pending bytes into the message being assembled; True once it is complete.

        The framing is ``FrameAssembler``'s (spec/tensors.md §6); what is ours is when bytes
        are consumed (flow control) and that no byte of a body is taken - no credit granted
        for it - before its whole declared size is reserved (§3.16).
        """
        if self._ready is not None:
            return True  # one message at a time: the next waits until this one is taken
        pending, frames = self._pending, self._frames
        if len(pending) == 1 and frames.state == BOUNDARY:
            chunk = pending[0]  # fast path: exactly one whole message is buffered (small RPCs)
            message = whole_frame(chunk)
            if message is not None:
                size = len(chunk)
                pending.clear()
                self._ready = message
                self._bytes_received += size
                self._pending_bytes -= size
                self._mux.consumed(self.stream_id, size)
                return True
        consumed = 0
        complete = False
        while True:
            state = frames.state
            if state == AWAITING_ADMISSION:
                # No byte of the body is taken (no credit granted) before its whole size is reserved (§3.16).
                size = frames.declared_length
                refusal = self._conn._budget.reserve(size)
                if refusal is not None:
                    if refusal.fatal:
                        self._refuse(refusal.code, f"{refusal.reason} (spec/transport.md §3.16)")
                    self._budget_wait = True  # keep the prefix; retried when budget is released
                    self._conn._budget.node.wait(self)
                    break
                self._budget_wait = False
                self._reserved = size
                frames.admit()
            elif state == COMPLETE:
                message = self._ready = frames.pop_frame()
                self._release()
                self._bytes_received += LENGTH_PREFIX_BYTES + len(message)
                complete = True
                break
            if not pending:
                break
            chunk = pending[0]
            try:
                taken = frames.take(chunk)
            except RemoteProtocolError as error:  # a length of 0 or over MAX_FRAME_BYTES (§6.3)
                self._refuse(error.code, error.message)
            if taken == len(chunk):
                pending.popleft()
            else:
                pending[0] = memoryview(chunk)[taken:]
            consumed += taken
        if consumed:
            self._pending_bytes -= consumed
            self._mux.consumed(self.stream_id, consumed)
        return complete

    def _refuse(self, code: ErrorCode, message: str) -> NoReturn:
        """The peer's next message cannot be taken: reset the stream with ``code`` and raise."""
        self._mux.reset_stream(self.stream_id, code, message)
        self._conn._flush()
        self._fail(RemoteProtocolError(code, message))
        raise RemoteProtocolError(code, message)

    # ------------------------------------------------------------------ closing

    def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort the stream both ways; the peer's pending and future calls raise StreamResetError."""
        if self._error is not None:
            return
        self._mux.reset_stream(self.stream_id, code, reason)
        self._conn._flush()
        self._fail(StreamResetError(code, reason or "reset by this side", by_peer=False))

    async def aclose(self) -> None:
        """Close: half-close for sending (if not yet), drop whatever the peer still sends.

        Never resets, so our last messages still reach a peer that reads them later.
        """
        if self._error is not None:
            return
        self._discard = True
        if self._pending_bytes:
            self._mux.consumed(self.stream_id, self._pending_bytes)
        self._pending.clear()
        self._pending_bytes = 0
        self._frames.discard()
        self._release()
        await self.send_eof()
        self._conn._flush()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            await self.aclose()
        else:
            self.reset(ErrorCode.STREAM_RESET, "aborted by the application")

    @property
    def awaiting_first_message(self) -> bool:
        """Opened by the peer, and its first message has not arrived yet (spec/transport.md §3.16.4)."""
        return not self.local and self._messages_received == 0 and self._ready is None and self._error is None and not self._eof

    @property
    def stall_marker(self) -> object:
        """What ``Connection.sweep_first_messages`` watches: "first" while the first message is awaited,
        the bytes assembled so far while a reserved message is coming (§3.16.1), else None."""
        if self.awaiting_first_message:
            return "first"
        if self._reserved and self._error is None:
            return self._frames.body_received
        return None

    @property
    def is_closed(self) -> bool:
        """True once the stream can carry nothing more either way."""
        return self._error is not None or (self._send_closed and self._eof)

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            stream_id=self.stream_id,
            protocol=self.protocol,
            messages_sent=self._messages_sent,
            messages_received=self._messages_received,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            send_window=self._mux.send_window(self.stream_id),
            receive_buffered=self._pending_bytes,
            send_closed=self._send_closed,
            receive_closed=self._eof,
        )

    # ------------------------------------------------------------------ events from the connection

    def _on_data(self, data: bytes) -> None:
        if self._discard:
            self._mux.consumed(self.stream_id, len(data))
            return
        if self._unary is not None and self._ready is None and not self._pending and self._frames.state == BOUNDARY:
            # Unary fast path: this chunk is exactly one whole message (a small call's request or
            # response, one DATA frame): what _absorb's own fast path does, without the queue.
            message = whole_frame(data)
            if message is not None:
                size = len(data)
                self._ready = message
                self._bytes_received += size
                self._mux.consumed(self.stream_id, size)
                return
        if self._unary is not None and self._ready is not None:
            self._unary_malformed("more than one message")
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._receiving or self._unary is not None:
            # The application is waiting for a message: consume right away, so the
            # window goes back to the sender now, and wake it only when complete.
            try:
                complete = self._absorb()
            except RemoteProtocolError:
                complete = True  # _fail already set the error; wake the reader
            if complete:
                waiter = self._receive_waiter
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def _on_last_data(self, data: bytes | memoryview) -> None:
        self._on_data(data)
        self._on_end()

    def _on_window(self) -> None:
        self._wake(self._window_waiter)

    def _on_end(self) -> None:
        self._eof = True
        unary = self._unary
        if unary is None:
            self._wake(self._receive_waiter)
            return
        if self._error is not None or self._budget_wait:
            return  # already reported by _fail, or the message waits for budget (_on_budget ends it)
        message = self._ready
        if message is None or self._pending or self._frames.state != BOUNDARY:
            self._unary_malformed("no message" if message is None else "more than one message")
            return
        self._ready = None
        self._messages_received += 1
        self._unary = None
        unary.complete(self, message)

    def _unary_malformed(self, why: str) -> None:
        """A unary stream carried something other than exactly one message (§3.11)."""
        unary, self._unary = self._unary, None  # told below, with the reason, not by _fail
        self.reset(ErrorCode.MALFORMED, f"expected exactly one message, got {why} (§3.11)")
        if unary is not None:
            error = RemoteProtocolError(ErrorCode.MALFORMED, f"stream {self.stream_id} ({self.protocol}): peer sent {why}, expected one")
            unary.failed(self, error)

    def _on_reset(self, code: int, reason: str) -> None:
        self._fail(stream_reset_error(code, reason))
        self._cancel_task()

    def _on_connection_lost(self, error: TransportError) -> None:
        self._fail(error)
        self._cancel_task()

    def _cancel_task(self) -> None:
        task = self._task_to_cancel
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _fail(self, error: TransportError | RemoteProtocolError) -> None:
        if self._error is None:
            self._error = error
        self._pending.clear()
        self._pending_bytes = 0
        self._frames.discard()
        self._release()
        self._wake(self._receive_waiter)
        self._wake(self._window_waiter)
        self._conn._stream_failed(self)
        unary = self._unary
        if unary is not None:
            self._unary = None
            unary.failed(self, self._error)

    def _release(self) -> None:
        """Give the reservation of the message being assembled back to the receive budget."""
        if self._reserved:
            waiters = self._conn._budget.release(self._reserved)
            self._reserved = 0
            if waiters:
                self._conn._loop.call_soon(retry_budget_waiters, waiters)

    def _on_budget(self) -> None:
        """Receive budget was released: retry the message that waits for it (§3.16)."""
        if not self._budget_wait or self._error is not None:
            return
        if self._unary is not None:
            try:
                self._absorb()
            except RemoteProtocolError:
                return  # _fail told the receiver
            if self._eof and not self._budget_wait:
                self._on_end()  # the FIN came while the message waited
            self._conn._flush()
        elif self._receiving:
            self._wake(self._receive_waiter)  # receive() retries; it also sends the credit
        else:
            self._budget_wait = False  # the next receive() retries

    @staticmethod
    def _wake(fut: asyncio.Future[None] | None) -> None:
        if fut is not None and not fut.done():
            fut.set_result(None)


def retry_budget_waiters(waiters: list[object]) -> None:
    """Let each stream that waited for receive budget retry (called soon after a release, §3.16)."""
    for stream in waiters:
        if isinstance(stream, Stream):
            stream._on_budget()
