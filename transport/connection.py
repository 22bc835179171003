"""One peer connection: TCP socket, handshake, secure channel, multiplexer, keepalive.

See spec/transport.md §2 (handshake) and §3 (streams). The sans-IO pieces
(``Handshake``, ``SecureChannel``, ``Mux``) do all protocol work; this module only
moves bytes between them and the socket and turns their events into wake-ups.

Reading is done in asyncio protocol callbacks, not a reader task: each chunk from
the socket (read into one buffer per connection, ``BufferedProtocol``) is
decrypted (whole frames straight out of that buffer: ``SecureChannel.receive_frames``),
parsed and dispatched to its ``Stream`` right away - the multiplexer
calls this connection's ``MuxEventSink`` methods, no event objects - and all
frames this produces (pongs, window updates) go out in one write. Writing is
``transport.write`` with the transport's high-water mark as backpressure
(``pause_writing``/``resume_writing``), so a sender never outruns the socket by
more than ``TransportConfig.write_buffer_high`` bytes. The only task per connection
is the keepalive, which pings every ``keepalive_interval`` seconds and records the
round-trip time.

Connections are made by ``Host`` (``host.py``); this module's public types are
``Connection``, ``ConnectionStatistics`` and ``TransportConfig``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from dataclasses import dataclass
from typing import Any, Callable

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from biopetals.protocol.handshake import HANDSHAKE_TIMEOUT, Handshake, HandshakeResult, Role
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.mux import Mux

from .admission import (
    FD_HEADROOM,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_PER_ADDRESS,
    ConnectionLimits,
)
from .logs import LOG_INTERVAL
from .budget import MAX_CONNECTION_BUFFER, MAX_MESSAGE_BUFFER, MAX_NODE_BUFFER, ConnectionBudget, ReceiveBudget
from .errors import ConnectionClosedError, DeadlineExceeded
from .streams import Stream, retry_budget_waiters
from .unary import UnaryCall, UnaryRequest, UnaryServer

__all__ = ["Connection", "ConnectionStatistics", "TransportConfig"]

log = logging.getLogger("biopetals.transport")


@dataclass(frozen=True)
class TransportConfig:
    """Tunables of the transport (spec/transport.md §3.12 names the normative ones)."""

    #: Seconds a connection may take from TCP connect to a finished handshake.
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    #: Seconds between keepalive pings on an open connection.
    keepalive_interval: float = 15.0
    #: Seconds without any reply (pong or other bytes) after a ping before the connection is dropped.
    keepalive_timeout: float = 10.0
    #: Default deadline of ``Host.call`` and ``Host.open_stream``.
    call_timeout: float = 30.0
    #: Largest receive window one stream grows to when its reader keeps up (§3.4).
    max_window: int = 4 * 1024 * 1024
    #: Socket write-buffer high-water mark: ``send`` waits above it.
    write_buffer_high: int = 4 * 1024 * 1024
    #: Seconds a closing connection may spend flushing before the socket is aborted.
    close_timeout: float = 2.0
    #: Largest message one stream may be assembling (§3.16, ``max_message_buffer``).
    max_message_buffer: int = MAX_MESSAGE_BUFFER
    #: Bytes of unfinished messages one connection may hold (§3.16, ``max_connection_buffer``).
    max_connection_buffer: int = MAX_CONNECTION_BUFFER
    #: Bytes of unfinished messages all connections together may hold (§3.16, ``max_node_buffer``).
    max_node_buffer: int = MAX_NODE_BUFFER
    #: Most handshakes in progress on accepted sockets (§3.16.2).
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    #: Most handshakes in progress from one source IP address (§3.16.2).
    max_pending_per_address: int = MAX_PENDING_PER_ADDRESS
    #: Most established inbound connections (§3.16.2).
    max_connections: int = MAX_CONNECTIONS
    #: Most established connections with one peer id (§3.16.2).
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    #: Descriptors kept free for dials and files: an accepted socket beyond is closed at once (§3.16.2).
    fd_headroom: int = FD_HEADROOM
    #: Seconds between two log lines of one kind of peer-caused warning; the rest are counted (§3.16.3).
    log_interval: float = LOG_INTERVAL
    #: A stream the peer opened is reset (TIMEOUT) if its first message has not arrived
    #: within this many seconds (not before 3/4 of it; §3.16.4). 0: never.
    first_message_timeout: float = 15.0

    def receive_budget(self) -> ReceiveBudget:
        """A node-wide receive budget with this configuration's limits."""
        return ReceiveBudget(self.max_message_buffer, self.max_connection_buffer, self.max_node_buffer)

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            self.max_pending_handshakes, self.max_pending_per_address, self.max_connections, self.max_connections_per_peer, self.fd_headroom
        )


@dataclass(frozen=True)
class ConnectionStatistics:
    peer_id: PeerId
    initiator: bool  # we dialled
    remote_address: tuple[str, int] | None
    streams_open: int
    rtt: float | None  # last keepalive round trip, seconds
    min_rtt: float | None
    bytes_sent: int  # on the socket, encrypted
    bytes_received: int
    write_buffer_size: int  # bytes accepted by the transport, not yet in the kernel
    going_away: bool
    closed: bool


class Connection:
    """An authenticated, multiplexed connection to ``peer_id``.

    Get one from ``Host.connect``; use ``open_stream``, ``ping``, ``aclose``.
    ``rtt`` is the last measured round-trip time (keepalive or ``ping``).
    """

    # More attributes than CPython shares keys for (30): slots keep attribute access on the
    # receive path a fixed offset instead of a per-instance dict lookup.
    __slots__ = (
        "_loop", "_transport", "_secure", "_mux", "_config", "peer_id", "local_peer_id", "initiator", "handshake_hash",
        "remote_address", "_streams", "_receive_plaintext", "_in_dispatch", "_write_paused", "_drain_waiters",
        "_pong_waiters", "rtt", "_min_rtt", "_bytes_sent", "_bytes_received", "_flush_scheduled", "_batching",
        "going_away", "_closing", "_close_reason", "_closed", "_closed_event", "_keepalive_task", "_abort_timer",
        "on_stream", "unary_servers", "on_going_away", "on_closed", "on_warning", "_budget", "__weakref__",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        result: HandshakeResult,
        *,
        initiator: bool,
        local_peer_id: PeerId,
        config: TransportConfig,
        budget: ConnectionBudget | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        # Unfinished messages of this connection's streams reserve their size here (§3.16).
        self._budget = budget if budget is not None else config.receive_budget().connection()
        self._secure = result.channel
        self._mux = Mux(initiator=initiator, max_window=config.max_window)
        self._config = config
        self.peer_id: PeerId = result.remote_peer_id
        self.local_peer_id = local_peer_id
        self.initiator = initiator
        self.handshake_hash = result.handshake_hash
        peer = transport.get_extra_info("peername")
        self.remote_address: tuple[str, int] | None = (peer[0], peer[1]) if peer else None
        # Stream, or on the unary hot path its light stand-in (unary.py): UnaryCall, UnaryRequest.
        self._streams: dict[int, Stream | UnaryCall | UnaryRequest] = {}
        self._receive_plaintext = functools.partial(self._mux.receive_data_into, sink=self)
        self._in_dispatch = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._pong_waiters: dict[bytes, asyncio.Future[float]] = {}
        self.rtt: float | None = None
        self._min_rtt: float | None = None
        self._bytes_sent = 0
        self._bytes_received = 0
        self._flush_scheduled = False
        self._batching = False  # a write went out this loop turn; later ones wait for _end_batch
        self.going_away = False
        self._closing = False
        self._close_reason: ConnectionClosedError | None = None
        self._closed: ConnectionClosedError | None = None
        self._closed_event = asyncio.Event()
        self._keepalive_task: asyncio.Task[None] | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        # Set by Host: called with each stream the peer opens, on GO_AWAY, and once closed.
        self.on_stream: Callable[[Stream], None] = lambda stream: stream.reset(ErrorCode.UNKNOWN_PROTOCOL, "no handlers")
        # Set by Host: its unary protocols; a stream opened for one gets a UnaryRequest, no Stream.
        self.unary_servers: dict[str, UnaryServer] = {}
        self.on_going_away: Callable[[Connection], None] = lambda conn: None
        self.on_closed: Callable[[Connection], None] = lambda conn: None
        # Set by Host: a peer-caused warning (kind, source, message), aggregated there (§3.16.3).
        self.on_warning: Callable[[str, str, str], None] = lambda kind, source, message: log.warning("%s: %s", kind, message)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "going away" if self.going_away else "open"
        return f"<Connection {'to' if self.initiator else 'from'} {self.peer_id} {state}>"

    # ------------------------------------------------------------------ public API

    @property
    def is_closed(self) -> bool:
        return self._closed is not None

    def open_stream(self, protocol: str, *, _flush: bool = True) -> Stream:
        """Open a stream for ``protocol`` (sent in its OPEN frame, §3.5). Does not wait.

        The peer resets it with UNKNOWN_PROTOCOL if it has no handler; that
        surfaces as ``UnknownProtocolError`` from the stream's next operation.
        """
        self._check_open()
        try:
            sid = self._mux.open_stream(protocol)
        except LocalProtocolError as exc:
            raise _closed_error(exc) from None
        stream = Stream(self, sid, protocol, local=True)
        self._streams[sid] = stream
        if _flush:  # else the caller sends at once and the OPEN frame leaves with its data
            self._flush_soon()
        return stream

    def open_unary(self, protocol: str, request: bytes | bytearray | memoryview, size: int, peer: Any, timeout: float) -> UnaryCall:
        """Send a one-frame request (``size`` <= ``unary.ONE_FRAME`` bytes) on a new stream, now.

        The unary hot path of ``Host.call`` (§3.11): OPEN, DATA and FIN go out in one
        write, and the returned ``UnaryCall``'s future gets the response.
        """
        self._check_open()
        try:
            sid = self._mux.open_unary(protocol, size.to_bytes(4, "big"), request, size + 4)
        except LocalProtocolError as exc:
            raise _closed_error(exc) from None
        call = self._streams[sid] = UnaryCall(self, sid, protocol, peer, timeout)
        self._flush()
        return call

    def _check_open(self) -> None:
        if self._closed is not None:
            raise self._closed
        if self.going_away or self._closing:
            raise ConnectionClosedError(f"connection to {self.peer_id} is going away; open a new one")

    async def ping(self, timeout: float | None = None) -> float:
        """Send a PING and return the round-trip time in seconds (§3.9)."""
        if self._closed is not None:
            raise self._closed
        fut: asyncio.Future[float] = self._loop.create_future()
        opaque = self._mux.send_ping(self._loop.time())
        self._pong_waiters[opaque] = fut
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except TimeoutError:
            raise DeadlineExceeded(f"no pong from {self.peer_id} within {timeout} s") from None
        finally:
            self._pong_waiters.pop(opaque, None)

    def close(self, code: int = 0, reason: str = "") -> None:
        """Close now: GO_AWAY, flush, close the socket. Open streams fail with ConnectionClosedError."""
        if self._closed is not None or self._closing:
            return
        self._closing = True
        if self._close_reason is None:
            why = f": {reason}" if reason else ""
            self._close_reason = ConnectionClosedError(f"connection to {self.peer_id} closed by this side{why}")
        try:
            self._mux.go_away(code, reason)
            self._flush()
        except ProtocolError:
            pass
        self._transport.close()
        # A peer that stops reading must not keep a closing socket open forever.
        self._abort_timer = self._loop.call_later(self._config.close_timeout, self._transport.abort)

    async def aclose(self) -> None:
        """``close`` and wait until the socket is closed."""
        self.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def retire(self) -> None:
        """Graceful close: no new streams either way (GO_AWAY); close once the open ones finish."""
        if self._closed is not None or self._closing:
            return
        if not self.going_away:
            self.going_away = True
            self._mux.go_away(0, "duplicate connection")
            self._flush()
        if not self._streams:
            self.close()

    def statistics(self) -> ConnectionStatistics:
        return ConnectionStatistics(
            peer_id=self.peer_id,
            initiator=self.initiator,
            remote_address=self.remote_address,
            streams_open=len(self._streams),
            rtt=self.rtt,
            min_rtt=self._min_rtt,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
            write_buffer_size=0 if self._transport.is_closing() else self._transport.get_write_buffer_size(),
            going_away=self.going_away,
            closed=self._closed is not None,
        )

    # ------------------------------------------------------------------ keepalive

    def start_keepalive(self, spawn: Callable[[Any], asyncio.Task[None]]) -> None:
        """Start the keepalive task with ``spawn`` (the Host's task group)."""
        if self._keepalive_task is None and self._closed is None and self._config.keepalive_interval > 0:
            self._keepalive_task = spawn(self._keepalive())

    async def _keepalive(self) -> None:
        interval, timeout = self._config.keepalive_interval, self._config.keepalive_timeout
        while self._closed is None:
            await asyncio.sleep(interval)
            if self._closed is not None:
                return
            received = self._bytes_received
            try:
                await self.ping(timeout)
            except DeadlineExceeded:
                if self._bytes_received > received:
                    continue  # pong stuck behind bulk data: the peer is alive (§3.9)
                self._abort(
                    ConnectionClosedError(
                        f"peer {self.peer_id} did not answer a keepalive ping within {timeout} s", code=ErrorCode.TIMEOUT
                    )
                )
                return
            except ConnectionClosedError:
                return

    def sweep_first_messages(self, sweep: int) -> int:
        """Sweep number ``sweep`` (one every ``first_message_timeout / 4`` s): reset each stream that has
        been stalled since three sweeps ago - opened by the peer and still without its first message
        (§3.16.4), or holding a receive-budget reservation for a message whose bytes stopped coming
        (§3.16.1: a declared message cannot hold budget without sending)."""
        expired = 0
        for stream in list(self._streams.values()):
            marker = getattr(stream, "stall_marker", None)
            if marker is None:
                if getattr(stream, "_stall", None) is not None:
                    stream._stall = None  # type: ignore[union-attr]
                continue
            if stream._stall != marker:  # type: ignore[union-attr]
                stream._first_sweep, stream._stall = sweep, marker  # type: ignore[union-attr]
            elif sweep - stream._first_sweep >= FIRST_MESSAGE_SWEEPS - 1:  # type: ignore[union-attr]
                timeout = self._config.first_message_timeout
                what = "no first message" if marker == "first" else "no progress of a reserved message"
                stream.reset(ErrorCode.TIMEOUT, f"{what} within {timeout:g} s (spec/transport.md §3.16.4)")
                expired += 1
        return expired

    # ------------------------------------------------------------------ output

    def _flush(self) -> None:
        """Encrypt and write everything the multiplexer has queued.

        Inside event dispatch this waits for the end of the dispatch. Otherwise the
        first flush of a loop turn writes at once (no added latency) and later ones
        in the same turn - 32 handlers answering together, say - are batched into
        one encryption and one write at the end of the turn.
        """
        if self._in_dispatch or self._batching or not self._mux.has_data_to_send() or self._transport.is_closing():
            return  # (when batching, _end_batch writes it with whatever else this loop turn queues)
        self._write()
        if len(self._streams) > 1:
            # Other streams may answer in this same turn: batch them. With one stream (a lone
            # call) nothing else is coming, and the end-of-turn callback would only cost time.
            self._batching = True
            self._loop.call_soon(self._end_batch)

    def _flush_now(self) -> None:
        """Write what is queued even inside a batch (the queue may hold views of a caller's buffer)."""
        if not self._in_dispatch and self._mux.has_data_to_send() and not self._transport.is_closing():
            self._write()

    def _end_batch(self) -> None:
        self._batching = False
        if self._closed is None and self._mux.has_data_to_send() and not self._transport.is_closing():
            self._write()

    def _write(self) -> None:
        wire = self._secure.encrypt(self._mux.data_to_send())
        self._bytes_sent += len(wire)
        # A view: asyncio keeps the unsent tail as ``data[n:]``, a copy for bytes.
        self._transport.write(memoryview(wire) if len(wire) > 65536 else wire)

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._deferred_flush)

    def _deferred_flush(self) -> None:
        self._flush_scheduled = False
        if self._closed is None:
            self._flush()

    async def _wait_writable(self) -> None:
        while self._write_paused and self._closed is None:
            fut: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut
        if self._closed is not None:
            raise self._closed

    def _pause_writing(self) -> None:
        self._write_paused = True

    def _resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain_waiters()

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # ------------------------------------------------------------------ input

    def _data_received(self, data: bytes | memoryview) -> None:
        """Bytes from the socket (a view of the reused receive buffer): decrypt and dispatch at once.

        ``SecureChannel.receive_frames`` decrypts whole frames straight out of ``data`` and
        hands each plaintext to the multiplexer, which calls this connection's
        ``MuxEventSink`` methods; then everything this produced goes out in one write.
        """
        self._bytes_received += len(data)
        self._in_dispatch = True
        try:
            self._secure.receive_frames(data, self._receive_plaintext)
        except ProtocolError as exc:
            self._in_dispatch = False
            self._abort_for(exc)
            return
        finally:
            self._in_dispatch = False
        self._flush()

    def _pump(self) -> None:
        """Decrypt and dispatch every complete frame buffered in the secure channel.

        The multiplexer calls this connection's ``MuxEventSink`` methods below
        directly (no event objects on this path).
        """
        secure, receive = self._secure, self._mux.receive_data_into
        self._in_dispatch = True
        try:
            while (plaintext := secure.next_plaintext()) is not None:
                receive(plaintext, self)
        except ProtocolError as exc:
            self._in_dispatch = False
            self._abort_for(exc)
            return
        finally:
            self._in_dispatch = False
        self._flush()

    # -- MuxEventSink (spec/transport.md §3.3): one method per multiplexer event

    def data_received(self, stream_id: int, data: bytes | memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._on_data(data)
        else:
            self._mux.consumed(stream_id, len(data))

    def window_updated(self, stream_id: int, delta: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._on_window()

    def stream_opened(self, stream_id: int, protocol: str) -> None:
        server = self.unary_servers.get(protocol)
        if server is not None:
            self._streams[stream_id] = UnaryRequest(self, stream_id, protocol, server)
            return
        stream = Stream(self, stream_id, protocol, local=False)
        self._streams[stream_id] = stream
        self.on_stream(stream)

    def data_ended(self, stream_id: int, data: bytes | memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._mux.consumed(stream_id, len(data))
            return
        stream._on_last_data(data)
        if not self._mux.is_open(stream_id):
            self._drop_stream(stream)

    def unary_opened(self, stream_id: int, protocol: str, data: bytes | memoryview) -> None:
        server = self.unary_servers.get(protocol)
        if server is None:  # a stream handler's, or none: as if the two frames came apart
            self.stream_opened(stream_id, protocol)
            self.data_ended(stream_id, data)
            return
        request = self._streams[stream_id] = UnaryRequest(self, stream_id, protocol, server)
        request._on_only_data(data)

    def stream_ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._on_end()
            if not self._mux.is_open(stream_id):
                self._drop_stream(stream)

    def stream_reset(self, stream_id: int, code: int, reason: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._on_reset(code, reason)

    def pong_received(self, opaque: bytes, sent_at: float) -> None:
        rtt = self._loop.time() - sent_at
        self.rtt = rtt
        self._min_rtt = rtt if self._min_rtt is None else min(self._min_rtt, rtt)
        fut = self._pong_waiters.get(opaque)
        if fut is not None and not fut.done():
            fut.set_result(rtt)

    def go_away_received(self, code: int, reason: str) -> None:
        self.going_away = True
        self.on_going_away(self)
        if not self._streams:
            self._loop.call_soon(self.close)

    def ping_received(self, opaque: bytes) -> None:
        pass  # the multiplexer already queued the pong

    # ------------------------------------------------------------------ stream bookkeeping

    def _stream_maybe_done(self, stream: Stream) -> None:
        if not self._mux.is_open(stream.stream_id):
            self._drop_stream(stream)

    def _stream_failed(self, stream: Stream) -> None:
        self._drop_stream(stream)

    def _drop_stream(self, stream: Stream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            if self.going_away and not self._streams and self._closed is None:
                self._loop.call_soon(self.close)

    # ------------------------------------------------------------------ closing

    def _abort_for(self, exc: ProtocolError) -> None:
        """The peer broke the protocol: tell it why (GO_AWAY), then close."""
        self.on_warning("closing a connection that broke the protocol", str(self.peer_id), f"{self.peer_id}: {exc}")
        error = ConnectionClosedError(f"connection to {self.peer_id} failed: {exc}", code=exc.code)
        error.__cause__ = exc
        self._close_reason = error
        self.close(int(exc.code), exc.message[:200])

    def _abort(self, error: ConnectionClosedError) -> None:
        if self._close_reason is None:
            self._close_reason = error
        self._closing = True
        self._transport.abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._closed is not None:
            return
        error = self._close_reason
        if error is None:
            why = f": {exc}" if exc else " by the peer"
            error = ConnectionClosedError(f"connection to {self.peer_id} closed{why}")
        self._closed = error
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        for stream in list(self._streams.values()):
            stream._on_connection_lost(error)
        self._streams.clear()
        waiters = self._budget.close()
        if waiters:
            self._loop.call_soon(retry_budget_waiters, waiters)
        self._wake_drain_waiters()
        for fut in self._pong_waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._pong_waiters.clear()
        if self._keepalive_task is not None and self._keepalive_task is not asyncio.current_task():
            self._keepalive_task.cancel()
        self._closed_event.set()
        self.on_closed(self)


def _closed_error(exc: LocalProtocolError) -> LocalProtocolError:
    """The multiplexer refused a new stream: a going-away connection is a ConnectionClosedError."""
    return ConnectionClosedError(exc.message) if exc.code == ErrorCode.CONNECTION_CLOSED else exc


#: Sweeps per ``first_message_timeout``: a silent stream is reset between 3/4 of it and all of it.
FIRST_MESSAGE_SWEEPS = 4

#: Size of each connection's receive buffer (one ``recv_into`` per socket read).
_RECV_BUFFER = 256 * 1024
#: Receive buffer of a connection still in its handshake (every handshake message is far
#: smaller): an unauthenticated socket costs little memory (spec/transport.md §3.16.2).
_HANDSHAKE_BUFFER = 2048


class _Wire(asyncio.BufferedProtocol):
    """asyncio callbacks of one TCP connection: the handshake first, then the Connection.

    ``on_ready(connection)`` runs once the handshake is done (before any stream data
    is dispatched); ``on_failed(error, peername)`` if it fails or times out.
    A dialling wire also resolves ``ready``. An accepting wire asks ``admit(wire,
    peername, fd)`` first and, refused, drops the socket before any handshake; it
    tells ``on_progress(wire)`` when handshake bytes arrive.

    A ``BufferedProtocol``: the socket is read into one buffer per connection
    (``recv_into``) instead of a fresh 256 KiB bytes object per read, whose
    allocation and shrinking cost more than the decryption of a small frame.
    """

    def __init__(
        self,
        *,
        identity: Identity,
        swarm_key: bytes | None,
        initiator: bool,
        config: TransportConfig,
        on_ready: Callable[[Connection], None],
        on_failed: Callable[[ProtocolError, Any], None],
        expected_peer_id: PeerId | None = None,
        budget: ReceiveBudget | None = None,
        admit: Callable[[_Wire, Any, int], bool] | None = None,
        on_progress: Callable[[_Wire], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._identity = identity
        self._swarm_key = swarm_key
        self._initiator = initiator
        self._config = config
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._expected = expected_peer_id
        self._budget = budget
        self._admit = admit
        self._on_progress = on_progress
        self._transport: asyncio.Transport | None = None
        self._handshake: Handshake | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._conn: Connection | None = None
        self._peername: Any = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future[Connection] | None = self._loop.create_future() if initiator else None
        self._recv_buffer = memoryview(bytearray(_HANDSHAKE_BUFFER))  # the full one once authenticated

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # TCP only (not peer input)
        self._transport = transport
        self._peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if self._admit is not None and not self._admit(self, self._peername, sock.fileno() if sock is not None else -1):
            transport.abort()  # refused (§3.16.2): no handshake state, no timer
            return
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=self._config.write_buffer_high)
        role = Role.INITIATOR if self._initiator else Role.RESPONDER
        self._handshake = Handshake(role, self._identity, self._swarm_key, self._expected)
        first = self._handshake.data_to_send()
        if first:
            transport.write(first)
        self._timer = self._loop.call_later(self._config.handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._recv_buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Consumers copy what they keep (SecureChannel buffers it), so the buffer is free again on return.
        conn = self._conn
        if conn is not None:
            conn._data_received(self._recv_buffer[:nbytes])
            return
        if self._on_progress is not None:
            self._on_progress(self)
        self._feed_handshake(bytes(self._recv_buffer[:nbytes]))

    def eof_received(self) -> bool:
        if self._conn is None and self._handshake is not None:
            self._feed_handshake(b"")
        return False  # close our side too: a half-closed connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        if self._conn is not None:
            self._conn._connection_lost(exc)
        elif self._handshake is not None:
            why = f": {exc}" if exc else ""
            self._fail(ConnectionClosedError(f"connection closed during the handshake{why}"))

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._conn._pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._conn._resume_writing()

    # -- handshake

    def abort(self) -> None:
        """Drop the socket (a cancelled dial)."""
        if self._transport is not None:
            self._transport.abort()

    def _feed_handshake(self, data: bytes) -> None:
        handshake, transport = self._handshake, self._transport
        if handshake is None or transport is None:
            return
        try:
            result = handshake.receive_data(data)
        except ProtocolError as exc:
            out = handshake.data_to_send()  # may hold a Rejection for the peer
            if out and not transport.is_closing():
                transport.write(out)
            self._fail(exc)
            return
        out = handshake.data_to_send()
        if out:
            transport.write(out)
        if result is not None:
            self._complete(result)

    def _complete(self, result: HandshakeResult) -> None:
        assert self._transport is not None
        if self._timer is not None:
            self._timer.cancel()
        self._handshake = None
        self._recv_buffer = memoryview(bytearray(_RECV_BUFFER))
        budget = self._budget.connection() if self._budget is not None else None
        conn = Connection(
            self._transport, result, initiator=self._initiator, local_peer_id=self._identity.peer_id, config=self._config, budget=budget
        )
        self._conn = conn
        if self._transport.is_closing():  # peer already gone; connection_lost follows
            return
        self._on_ready(conn)
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(conn)
        conn._pump()  # frames that arrived right behind the last handshake message

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._conn is None and self._handshake is not None:
            who = f" with {self._peername[0]}:{self._peername[1]}" if self._peername else ""
            self._fail(DeadlineExceeded(f"handshake{who} not finished within {self._config.handshake_timeout} s"))

    def _fail(self, error: ProtocolError) -> None:
        if self._handshake is None:
            return
        self._handshake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(error)
        self._on_failed(error, self._peername)
        if self._transport is not None and not self._transport.is_closing():
            # close() still writes a queued Rejection; abort if the peer will not take it.
            self._transport.close()
            self._abort_timer = self._loop.call_later(self._config.close_timeout, self._transport.abort)
