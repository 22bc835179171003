"""Light stand-ins for ``Stream`` on the unary hot path (spec/transport.md §3.11).

A small request/response call (``Host.call`` with a pooled connection and a one-frame
request) and the serving side of a unary protocol need none of what a ``Stream``
offers for long conversations - queues, window waits, message assembly - in the
usual case, where the request and the response each arrive as one whole message in
one DATA frame. These two classes handle exactly that case with a few attributes
and no queues:

* ``UnaryCall``, the caller's side: OPEN, DATA and FIN leave in one buffer
  (``Mux.open_unary``); the response resolves ``future``.
* ``UnaryRequest``, the server's side: the request is handed to the protocol's
  ``UnaryServer`` (an inline handler answers right there, an async one gets a task).

Both sit in ``Connection._streams`` in place of a ``Stream`` and receive the same
calls from the connection (``_on_data``, ``_on_end``, ``_on_reset``, ...). Anything
else - a message split over several frames, a response too big for one frame or for
the peer's window - *upgrades* the stand-in: a real ``Stream`` takes its place in
the connection, inherits its state and carries on with the general code (which
also checks for malformed input), reporting back through the same receiver
interface. The wire is the same either way.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.framing import LENGTH_PREFIX_BYTES, frame_prefix, whole_frame
from biopetals.protocol.identity import PeerId
from biopetals.protocol.mux import MAX_DATA_PAYLOAD

from .errors import DeadlineExceeded, StreamResetError, TransportError, stream_reset_error
from .link import StreamLink
from .streams import Stream

__all__ = ["UnaryCall", "UnaryRequest", "UnaryServer", "ONE_FRAME"]

#: Largest message that travels with its length prefix in one DATA frame.
ONE_FRAME = MAX_DATA_PAYLOAD - LENGTH_PREFIX_BYTES


class UnaryServer:
    """What serves one unary protocol: ``complete(request_stream, request)`` is told each
    complete request (an inline handler answers there, an async one starts its task)."""

    __slots__ = ("complete",)

    def __init__(self, complete: Callable[[Any, bytes], None]) -> None:
        self.complete = complete

    def failed(self, stream: Any, error: BaseException) -> None:
        pass  # the request never completed (reset, connection lost, malformed): nobody to answer


class _StandIn:
    """What both stand-ins share: the one message kept until the FIN, and the upgrade."""

    __slots__ = ("_conn", "stream_id", "protocol", "_message", "_stream")

    def __init__(self, conn: StreamLink, stream_id: int, protocol: str) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.protocol = protocol
        self._message: bytes | None = None  # the one message, until the FIN
        self._stream: Stream | None = None  # the Stream that took over (module docstring)

    def _keep(self, data: bytes | memoryview) -> bool:
        """Keep ``data`` as the message if it is exactly one (and consume it); False if not."""
        message = whole_frame(data)  # exactly one message (spec/tensors.md §6), else None
        if message is None:
            return False
        self._message = message
        self._conn._mux.consumed(self.stream_id, len(data))
        return True

    def _hand_over(self, data: bytes | memoryview, *, end: bool) -> None:
        """Let a Stream take ``data`` (and the FIN, if ``end``): it handles what we do not."""
        stream = self._upgrade()
        stream._on_data(data)
        if end:
            stream._on_end()

    def _upgrade(self) -> Stream:
        raise NotImplementedError


class UnaryCall(_StandIn):
    """The caller's side of one small call: the request is already sent; ``future`` gets the
    response or the error. Also the call's entry in ``Host._deadlines`` (``active`` until the
    caller has returned)."""

    __slots__ = ("future", "peer", "timeout", "deadline", "timer", "active", "received")

    def __init__(self, conn: StreamLink, stream_id: int, protocol: str, peer: Any, timeout: float) -> None:
        super().__init__(conn, stream_id, protocol)
        self.future: asyncio.Future[bytes] = conn._loop.create_future()
        self.peer = peer
        self.timeout = timeout
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None  # only for a deadline out of order (Host._watch_deadline)
        self.active = True
        self.received = False  # any response bytes arrived (a refused stream has none)

    @property
    def is_closed(self) -> bool:
        """True once the stream carries nothing more (the multiplexer forgot it, or it was reset)."""
        if self._stream is not None:
            return self._stream.is_closed
        return not self._conn._mux.is_open(self.stream_id)

    # -- from the connection

    def _on_data(self, data: bytes | memoryview) -> None:
        self.received = True
        if self._message is not None or not self._keep(data):
            self._hand_over(data, end=False)

    def _on_last_data(self, data: bytes | memoryview) -> None:
        """The response and its FIN at once (the usual case): the stream is already closed both ways."""
        self.received = True
        if self._message is None and self._stream is None:
            message = whole_frame(data)  # exactly one message (spec/tensors.md §6), else None
            if message is not None:
                if not self.future.done():
                    self.future.set_result(message)
                return
        self._hand_over(data, end=True)

    def _on_end(self) -> None:
        message = self._message
        if message is None:
            self._malformed("no message")
            return
        self._message = None
        if not self.future.done():
            self.future.set_result(message)

    def _on_window(self) -> None:
        pass  # everything was sent with the OPEN

    def _on_reset(self, code: int, reason: str) -> None:
        self.failed(self, stream_reset_error(code, reason))
        self._conn._stream_failed(self)

    def _on_connection_lost(self, error: TransportError) -> None:
        self.failed(self, error)

    # -- UnaryReceiver, for the Stream after an upgrade

    def complete(self, stream: Any, message: bytes) -> None:
        if not self.future.done():
            self.future.set_result(message)

    def failed(self, stream: Any, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    # -- the caller's side

    def reset(self, code: int, reason: str) -> None:
        """Give up: RESET the stream (the peer stops working for us)."""
        if self._stream is not None:
            self._stream.reset(code, reason)
            return
        conn = self._conn
        conn._mux.reset_stream(self.stream_id, code, reason)
        conn._flush()
        conn._stream_failed(self)

    def finish(self) -> None:
        """The caller returned or raised: no deadline to keep; let go of the peer."""
        self.active = False
        self.peer = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        """The deadline passed: fail the call and tell the peer to stop (RESET TIMEOUT)."""
        if not self.active:
            return
        self.failed(self, DeadlineExceeded(f"call {self.protocol} to {self.peer} did not complete within {self.timeout} s"))
        if not self.is_closed:
            self.reset(ErrorCode.TIMEOUT, "caller gave up")

    def _malformed(self, why: str) -> None:
        self.reset(ErrorCode.MALFORMED, f"expected exactly one message, got {why} (§3.11)")
        self.failed(self, RemoteProtocolError(ErrorCode.MALFORMED, f"stream {self.stream_id} ({self.protocol}): peer sent {why}, expected one"))

    def _upgrade(self) -> Stream:
        stream = self._stream
        if stream is None:
            conn = self._conn
            stream = self._stream = Stream(conn, self.stream_id, self.protocol, local=True)
            stream._send_closed = True
            stream._messages_sent = 1
            stream._ready = self._message  # a second message makes the Stream report MALFORMED
            stream._unary = self
            self._message = None
            conn._streams[self.stream_id] = stream
        return stream


class UnaryRequest(_StandIn):
    """The serving side of one request on a unary protocol, until it is answered.

    Offers what the Host's unary serving code uses of a ``Stream``: ``peer_id``,
    ``protocol``, ``_try_send_last``, ``send``, ``reset``, ``_task_to_cancel``.
    """

    __slots__ = ("_server", "_task_to_cancel", "_closed", "_first_sweep", "_stall")

    def __init__(self, conn: StreamLink, stream_id: int, protocol: str, server: UnaryServer) -> None:
        super().__init__(conn, stream_id, protocol)
        self._server: UnaryServer | None = server  # None once told of the request (or reset)
        self._task_to_cancel: asyncio.Task[None] | None = None  # an async handler working for the caller
        self._closed = False
        self._first_sweep = 0  # Connection.sweep_first_messages: the sweep that first saw it waiting
        self._stall: object = None

    @property
    def awaiting_first_message(self) -> bool:
        """The request has not arrived yet (spec/transport.md §3.16.4)."""
        return self._server is not None and not self._closed and self._stream is None

    @property
    def stall_marker(self) -> object:
        """"first" while the request is awaited (Connection.sweep_first_messages), else None."""
        return "first" if self.awaiting_first_message else None

    @property
    def peer_id(self) -> PeerId:
        return self._conn.peer_id

    @property
    def is_closed(self) -> bool:
        return self._closed if self._stream is None else self._stream.is_closed

    # -- from the connection

    def _on_data(self, data: bytes | memoryview) -> None:
        if self._message is not None or self._server is None or not self._keep(data):
            self._hand_over(data, end=False)

    def _on_only_data(self, data: bytes | memoryview) -> None:
        """The stream's only DATA, with FIN, arrived with its OPEN (``Connection.unary_opened``):
        anything but exactly one message is MALFORMED."""
        message = whole_frame(data)  # exactly one message (spec/tensors.md §6), else None
        if message is None:
            self.reset(ErrorCode.MALFORMED, "expected exactly one message (§3.11)")
            return
        self._conn._mux.consumed(self.stream_id, len(data))
        server, self._server = self._server, None
        if server is not None:
            server.complete(self, message)

    def _on_last_data(self, data: bytes | memoryview) -> None:
        """DATA with FIN on a request opened earlier: usually the whole request at once."""
        if self._message is None and self._server is not None and self._keep(data):
            self._on_end()
        else:
            self._hand_over(data, end=True)

    def _on_end(self) -> None:
        message, server = self._message, self._server
        if server is None:
            return
        self._server = self._message = None
        if message is None:
            self.reset(ErrorCode.MALFORMED, "expected exactly one message, got no message (§3.11)")
            return
        server.complete(self, message)

    def _on_window(self) -> None:
        pass  # a response that waits for window is sent by a Stream (``send``)

    def _on_reset(self, code: int, reason: str) -> None:
        self._closed = True
        self._server = None
        self._conn._stream_failed(self)
        self._cancel_task()

    def _on_connection_lost(self, error: TransportError) -> None:
        self._closed = True
        self._server = None
        self._cancel_task()

    def _cancel_task(self) -> None:
        task = self._task_to_cancel
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    # -- answering

    def _try_send_last(self, message: bytes | bytearray | memoryview) -> bool:
        """Queue the response with FIN if it fits one frame and the caller's window; False if not."""
        if self._stream is not None:
            return self._stream._try_send_last(message)
        if self._closed:
            return False
        size = len(message) if type(message) is bytes else memoryview(message).nbytes
        if size > ONE_FRAME:
            return False
        conn = self._conn
        queued = conn._mux.send_last_message(self.stream_id, frame_prefix(size), message, size + LENGTH_PREFIX_BYTES)
        if not queued:
            return False
        self._closed = True
        if queued == 2:
            conn._drop_stream(self)
        conn._flush()
        return True

    async def send(self, message: bytes | bytearray | memoryview, *, end: bool = False) -> None:
        """Send through a Stream (a response too big for ``_try_send_last``)."""
        if self._closed and self._stream is None:
            raise StreamResetError(ErrorCode.STREAM_RESET, f"stream {self.stream_id} ({self.protocol}) is closed", by_peer=False)
        await self._upgrade().send(message, end=end)

    def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        if self._stream is not None:
            self._stream.reset(code, reason)
            return
        if self._closed:
            return
        self._closed = True
        self._server = None
        conn = self._conn
        conn._mux.reset_stream(self.stream_id, code, reason)
        conn._flush()
        conn._stream_failed(self)

    def _upgrade(self) -> Stream:
        stream = self._stream
        if stream is None:
            conn = self._conn
            stream = self._stream = Stream(conn, self.stream_id, self.protocol, local=False)
            stream._task_to_cancel = self._task_to_cancel
            if self._server is not None:  # the request is still coming: the Stream assembles it
                stream._unary = self._server
                stream._ready = self._message  # a second message makes the Stream report MALFORMED
            else:  # the request is in (FIN received): only the response is left
                stream._eof = True
                stream._messages_received = 1
            self._server = self._message = None
            conn._streams[self.stream_id] = stream
        return stream
