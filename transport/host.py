"""``Host``: this peer on the network - listen, dial, pool connections, serve and call RPCs.

See spec/transport.md §3.10 (RPC) and §3.12 (connections). Usage::

    async with Host(identity, swarm_key=swarm_key) as host:
        await host.listen("0.0.0.0", 31337)
        print(host.addrs)                                   # [/ip4/.../tcp/31337/p2p/12D3KooW...]
        host.set_handler("/echo/1", echo)                   # async def echo(peer_id, request) -> bytes
        host.set_inline_handler("/lookup/1", lookup)        # def lookup(peer_id, request) -> bytes (cheap, §3.11)
        host.set_stream_handler("/chat/1", chat)            # async def chat(peer_id, stream) -> None
        reply = await host.call("/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW...", "/echo/1", b"hi", timeout=5)
        stream = await host.open_stream(peer_id, "/chat/1")

A peer is named by a ``PeerId`` (we must already know an address or hold a
connection), a ``Multiaddr`` or a multiaddr string. One connection per peer is
kept and reused (§3.12); if both peers dial each other at once, both keep the
connection dialled by the smaller peer id and retire the other (GO_AWAY, closed
when its streams are done).

All background work (keepalives, handlers, dials) runs in the host's
``asyncio.TaskGroup``; leaving ``async with`` closes every connection and waits for it.

Unary handlers come in two kinds (the wire is the same, spec/transport.md §3.11):

* ``set_handler``: ``async def handler(peer_id, request) -> bytes``, run as a task per
  request, started once the whole request is in (the request is gathered by the same
  receive path as for inline handlers, so no task waits for it); may await anything,
  is cancelled when the caller resets the stream. On Python >= 3.12 the task starts
  eagerly (its first step runs in the receive path, inside the task).
* ``set_inline_handler``: ``def handler(peer_id, request) -> bytes``, called directly
  in the receive path once the whole request (OPEN, DATA, FIN) is in; its response
  leaves in the same write as everything else that read produced. No task, no future,
  no loop turn - roughly half the cost of a small call on the serving side. The
  handler must be cheap and must never block: in-memory lookups such as the DHT's
  RPCs, not model steps or I/O (the whole connection, and every other, waits while
  it runs).

``call`` itself creates no task: when a connection is pooled and the request fits
in one frame, it queues OPEN + DATA + FIN, awaits one future that the receive path
resolves with the response; its deadline is kept by one timer shared by all calls
(``Host._deadlines``), not a timer per call. Both ends of such a call use light stand-ins
for a ``Stream`` (unary.py), which hand over to a real one for anything unusual.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import socket
import sys
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Union

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.limits import MAX_FRAME_BYTES
from biopetals.protocol.mux import validate_protocol_name
from biopetals.protocol.swarm_key import SwarmKey

from .admission import Admission, raise_descriptor_limit
from .logs import LogAggregator
from .connection import FIRST_MESSAGE_SWEEPS, Connection, TransportConfig, _Wire
from .errors import ConnectionClosedError, DeadlineExceeded, StreamResetError, TransportError
from .streams import Stream
from .unary import ONE_FRAME, UnaryCall, UnaryRequest, UnaryServer

__all__ = ["Host", "HostStatistics", "UnaryHandler", "InlineHandler", "StreamHandler", "PeerLike"]

log = logging.getLogger("biopetals.transport")

UnaryHandler = Callable[[PeerId, bytes], Awaitable[bytes]]
InlineHandler = Callable[[PeerId, bytes], Union[bytes, bytearray, memoryview]]
StreamHandler = Callable[[PeerId, Stream], Awaitable[None]]
PeerLike = Union[PeerId, Multiaddr, str]

#: Unary handler tasks start eagerly where asyncio can (Task(eager_start=True), Python >= 3.12).
_EAGER_TASKS = sys.version_info >= (3, 12)
#: Handler tasks tracked before the set is first swept for tasks that ended without running.
_PRUNE_HANDLERS = 64
#: Entries in ``Host._deadlines`` before it is first swept for finished calls.
_COMPACT_DEADLINES = 1024

_HINTS = {
    ErrorCode.SWARM_KEY_MISMATCH: " - use the swarm key file (e.g. lab.key) of the swarm you are joining, or none for a public swarm",
    ErrorCode.PEER_ID_MISMATCH: " - the /p2p/ id in the address is wrong or stale (another node now listens there)",
    ErrorCode.BAD_IDENTITY: " - the peer's identity key or signature is invalid (a broken or hostile peer)",
    ErrorCode.HANDSHAKE_FAILED: " - the peer speaks another protocol version, or the bytes were altered in transit",
    ErrorCode.UNSUPPORTED_VERSION: " - upgrade the older of the two peers",
}


@dataclass(frozen=True)
class HostStatistics:
    peer_id: PeerId
    listen_addrs: tuple[str, ...]
    connections: int
    inbound: int
    outbound: int
    streams_open: int
    handlers_running: int
    dials_in_progress: int
    handshakes_in_progress: int
    handshakes_completed: int
    handshakes_failed: dict[str, int]  # by error code name
    bytes_sent: int
    bytes_received: int
    inline_requests: int = 0  # requests answered by inline handlers (no task each), since start
    receive_buffer_held: int = 0  # bytes reserved for unfinished incoming messages (§3.16)
    messages_refused: int = 0  # incoming messages refused by the receive budget, since start


class Host:
    """This peer: identity, swarm key, listeners, connection pool and RPC handlers.

    ``swarm_key`` None means a public swarm (spec/transport.md §2). Use as
    ``async with Host(...) as host``; see the module docstring.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        swarm_key: SwarmKey | bytes | None,
        config: TransportConfig | None = None,
    ) -> None:
        self.identity = identity
        self._swarm_key = swarm_key.key if isinstance(swarm_key, SwarmKey) else swarm_key
        self.config = config or TransportConfig()
        # Bytes of unfinished incoming messages, over every connection (spec/transport.md §3.16).
        self._budget = self.config.receive_budget()
        # Pending handshakes and established connections, bounded (§3.16.2); the descriptor
        # limit is learnt (and raised) when the host starts listening.
        self._admission = Admission(self.config.connection_limits())
        self._logs = LogAggregator(self.config.log_interval)  # peer-caused warnings, aggregated (§3.16.3)
        self._sweeper: asyncio.Task[None] | None = None  # resets streams without a first message (§3.16.4)
        self._tg: asyncio.TaskGroup | None = None
        self._running = False
        self._servers: list[asyncio.Server] = []
        self._stream_handlers: dict[str, StreamHandler] = {}
        # Unary protocols, inline or async; shared with every connection (Connection.unary_servers).
        self._unary_servers: dict[str, UnaryServer] = {}
        self._conns: dict[PeerId, list[Connection]] = {}
        self._addresses: dict[PeerId, Multiaddr] = {}
        self._dials: dict[Any, asyncio.Future[Connection]] = {}
        self._handshaking: set[_Wire] = set()
        self._handler_tasks: set[asyncio.Task[None]] = set()
        self._prune_handlers_at = _PRUNE_HANDLERS
        self._dial_tasks: set[asyncio.Task[None]] = set()
        self._handshakes_completed = 0
        self._handshakes_failed: Counter[str] = Counter()
        self._closed_bytes = [0, 0]  # sent, received, of connections already closed
        self._inline_requests = 0
        # Deadlines of fast-path calls (``call``): one timer for all, armed at the earliest
        # (spec/transport.md §3.11). Calls mostly end in the order they start, so finished
        # ones are trimmed from the front; a rare compaction drops the rest.
        self._deadlines: deque[UnaryCall] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._compact_deadlines_at = _COMPACT_DEADLINES

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id

    def __repr__(self) -> str:
        return f"<Host {self.peer_id}>"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Host:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._running = True
        if self.config.first_message_timeout > 0:
            self._sweeper = self._tg.create_task(self._sweep_first_messages())
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        assert self._tg is not None
        try:
            await self._shutdown()
        finally:
            result = await self._tg.__aexit__(exc_type, exc, tb)
        return result

    async def _sweep_first_messages(self) -> None:
        """Every ``first_message_timeout / 4`` s, reset streams still silent (spec/transport.md §3.16.4)."""
        period = self.config.first_message_timeout / FIRST_MESSAGE_SWEEPS
        sweep = 0
        while True:
            await asyncio.sleep(period)
            sweep += 1
            expired = sum(conn.sweep_first_messages(sweep) for conn in self.connections())
            if expired:
                self.warn("reset streams without a first message", "?", f"{expired} within {self.config.first_message_timeout:g} s")

    async def _shutdown(self) -> None:
        self._running = False
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for wire in list(self._handshaking):
            wire.abort()
        for fut in list(self._dials.values()):
            fut.cancel()
        for task in list(self._dial_tasks):
            task.cancel()
        conns = [c for group in self._conns.values() for c in group]
        for conn in conns:
            conn.close(0, "host shutting down")
        handlers = [t for t in self._handler_tasks if not t.done()]
        for task in handlers:
            task.cancel()
        if self._deadline_timer is not None:  # every pending call fails as its connection closes
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadlines.clear()
        if conns:
            await asyncio.wait([asyncio.ensure_future(c.wait_closed()) for c in conns], timeout=self.config.close_timeout + 1)
        if handlers:
            await asyncio.wait(handlers)  # unary handlers run outside the task group
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        for line in self._logs.flush(asyncio.get_running_loop().time()):
            log.warning("%s", line)

    def _check_running(self) -> asyncio.TaskGroup:
        if not self._running or self._tg is None:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "host is not running: use `async with Host(...) as host`")
        return self._tg

    # ------------------------------------------------------------------ listening

    async def listen(self, host: str = "127.0.0.1", port: int = 0) -> list[Multiaddr]:
        """Accept connections on ``host``:``port`` (0 = any free port); returns ``addrs``.

        ``host`` may also be a multiaddr such as ``/ip4/0.0.0.0/tcp/31337``.
        """
        self._check_running()
        if self._admission.fd_limit is None:
            self._admission.fd_limit = raise_descriptor_limit()
        if host.startswith("/"):
            addr = Multiaddr.parse(host)
            host, port = addr.host, addr.port
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._accepting_wire, host, port, reuse_address=True)
        self._servers.append(server)
        addrs = self.addrs
        log.info("listening on %s", ", ".join(map(str, addrs)))
        return addrs

    @property
    def addrs(self) -> list[Multiaddr]:
        """Our listen addresses with ``/p2p/<our peer id>`` (0.0.0.0 if bound to all interfaces)."""
        out = []
        for server in self._servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                kind = "ip6" if sock.family == socket.AF_INET6 else "ip4"
                out.append(Multiaddr(kind, host, port, self.peer_id))
        return out

    def _accepting_wire(self) -> _Wire:
        wire: _Wire

        def ready(conn: Connection) -> None:
            self._handshaking.discard(wire)
            self._admission.forget(wire)
            self._adopt(conn)

        def failed(error: ProtocolError, peername: Any) -> None:
            self._handshaking.discard(wire)
            self._admission.forget(wire)
            self._handshakes_failed[_code_name(error.code)] += 1
            where = f"{peername[0]}:{peername[1]}" if peername else "?"
            self.warn("inbound handshake failed", peername[0] if peername else "?", f"from {where}: {_with_hint(error).message}")

        wire = _Wire(
            identity=self.identity,
            swarm_key=self._swarm_key,
            initiator=False,
            config=self.config,
            on_ready=ready,
            on_failed=failed,
            budget=self._budget,
            admit=self._admit,
            on_progress=self._admission.progressed,
        )
        self._handshaking.add(wire)
        return wire

    def _admit(self, wire: _Wire, peername: Any, fd: int) -> bool:
        """An accepted socket: within the limits of §3.16.2? Evicts idle pending handshakes to make room."""
        refusal, evict = self._admission.accept(wire, peername[0] if peername else "?", fd if fd >= 0 else None)
        source = peername[0] if peername else "?"
        if refusal is not None:
            self._handshaking.discard(wire)
            self._handshakes_failed["REFUSED"] += 1
            self.warn("refused an inbound connection", source, f"from {source}: too many {refusal} (spec/transport.md §3.16.2)")
            return False
        for victim in evict:
            self._handshakes_failed["EVICTED"] += 1
            self.warn("dropped a pending handshake", source, "to make room for a newer one (spec/transport.md §3.16.2)")
            victim.abort()  # type: ignore[attr-defined]
        return True

    def warn(self, kind: str, source: str, message: str) -> None:
        """Log a warning a peer can cause (for this host's users too): at most one line per ``kind``
        and ``log_interval``, the rest counted by ``source`` (spec/transport.md §3.16.3)."""
        line = self._logs.note(kind, source, message, asyncio.get_running_loop().time())
        if line is not None:
            log.warning("%s", line)

    # ------------------------------------------------------------------ handlers

    def set_handler(self, protocol: str, handler: UnaryHandler) -> None:
        """Serve request/response calls: ``async def handler(peer_id, request: bytes) -> bytes``.

        Raise a ``ProtocolError`` to answer with its code and message (the caller
        gets ``StreamResetError``); any other exception answers INTERNAL.
        Each request runs in its own task; a handler that never awaits is better
        served by ``set_inline_handler``.
        """
        self._set_unary(protocol, UnaryServer(functools.partial(self._start_unary, handler)))

    def set_inline_handler(self, protocol: str, handler: InlineHandler) -> None:
        """Serve request/response calls with a plain function: ``def handler(peer_id, request: bytes) -> bytes``.

        Called directly in the receive path once the whole request has arrived (a big
        request is buffered until its FIN first); the response goes out in the same
        loop turn. No task, future or loop turn per request. Contract: the handler is
        cheap and never blocks or waits - in-memory lookups such as DHT RPCs; anything
        that computes for long or does I/O belongs in an async ``set_handler``. It
        cannot be cancelled (it has finished before the caller could give up). Errors
        are answered as for ``set_handler``: ``ProtocolError`` resets the stream with
        its code, any other exception with INTERNAL; the host keeps serving. The
        returned buffer must not be modified afterwards.
        """
        if inspect.iscoroutinefunction(handler):
            raise LocalProtocolError(
                ErrorCode.INVALID_FIELD, f"inline handler for {protocol!r} is a coroutine function: use set_handler for async handlers"
            )
        self._set_unary(protocol, UnaryServer(functools.partial(self._serve_inline, handler)))

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve streams: ``async def handler(peer_id, stream)``; the stream is closed when it returns."""
        self._unary_servers.pop(_check_protocol(protocol), None)
        self._stream_handlers[protocol] = handler

    def _set_unary(self, protocol: str, server: UnaryServer) -> None:
        self._stream_handlers.pop(_check_protocol(protocol), None)
        self._unary_servers[protocol] = server

    def remove_handler(self, protocol: str) -> None:
        self._stream_handlers.pop(protocol, None)
        self._unary_servers.pop(protocol, None)

    def _on_stream(self, stream: Stream) -> None:
        """A stream opened by a peer for a protocol that is not unary (those are served by
        UnaryRequest, which the connection creates itself)."""
        handler = self._stream_handlers.get(stream.protocol) if self._running else None
        if handler is None:
            stream.reset(ErrorCode.UNKNOWN_PROTOCOL, f"peer {self.peer_id} has no handler for protocol {stream.protocol!r}")
            return
        assert self._tg is not None
        tasks = self._handler_tasks
        task = self._tg.create_task(self._serve_stream(stream, handler))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _start_unary(self, handler: UnaryHandler, stream: Stream, request: bytes) -> None:
        """A complete request for an async handler: run it in a task (set_handler, §3.11).

        No task exists before the request is complete, so a request that never completes
        (reset, malformed, connection lost) costs no task at all.
        """
        if not self._running or self._tg is None:
            stream.reset(ErrorCode.CONNECTION_CLOSED, "peer is shutting down")
            return
        tasks = self._handler_tasks
        # A plain task with no done-callback (each costs a loop turn per call): _serve_unary
        # lets only CancelledError out and removes itself from the set when it ends;
        # _shutdown cancels and awaits these itself.
        coro = self._serve_unary(stream, handler, request)
        if _EAGER_TASKS:
            # Python >= 3.12: the handler starts right here, inside its own task, and a handler
            # that finishes without waiting has answered before this returns (no loop turn).
            task = asyncio.Task(coro, loop=stream._conn._loop, eager_start=True)
            if task.done():
                return
        else:
            task = stream._conn._loop.create_task(coro)
        stream._task_to_cancel = task  # the caller gave up: stop working for it
        tasks.add(task)
        if len(tasks) >= self._prune_handlers_at:
            # A task cancelled before its first step never ran its body: drop such leftovers.
            tasks.difference_update([t for t in tasks if t.done()])
            self._prune_handlers_at = max(_PRUNE_HANDLERS, 2 * len(tasks))

    async def _serve_unary(self, stream: Stream, handler: UnaryHandler, request: bytes) -> None:
        try:
            try:
                response = await handler(stream.peer_id, request)
            except Exception as exc:
                _handler_failed(stream, exc)
                return
            if not _usable_response(stream, response):
                return
            # One frame that fits the window (the usual response): queue it with FIN, no waiting.
            if len(response) > ONE_FRAME or not stream._try_send_last(response):
                await stream.send(response, end=True)
        except (TransportError, RemoteProtocolError):
            pass  # stream reset or connection gone: nobody to answer
        except asyncio.CancelledError:
            stream.reset(ErrorCode.CONNECTION_CLOSED, "peer is shutting down")
            raise
        except Exception:  # a bug of ours must not take the host's task group down
            log.exception("serving %s failed", stream.protocol)
            stream.reset(ErrorCode.INTERNAL, f"internal error serving {stream.protocol}")
        finally:
            self._handler_tasks.discard(stream._task_to_cancel)  # type: ignore[arg-type]

    async def _serve_stream(self, stream: Stream, handler: StreamHandler) -> None:
        try:
            await handler(stream.peer_id, stream)
        except (TransportError, RemoteProtocolError) as exc:
            if not stream.is_closed:
                stream.reset(exc.code, exc.message)
            return
        except ProtocolError as exc:
            stream.reset(exc.code, exc.message)
            return
        except asyncio.CancelledError:
            stream.reset(ErrorCode.CONNECTION_CLOSED, "peer is shutting down")
            raise
        except Exception:
            log.exception("stream handler for %s failed", stream.protocol)
            stream.reset(ErrorCode.INTERNAL, f"internal error in the handler for {stream.protocol}")
            return
        try:
            await stream.aclose()
        except (TransportError, RemoteProtocolError):
            pass

    # ------------------------------------------------------------------ connections

    def add_address(self, peer_id: PeerId, addr: Multiaddr | str) -> None:
        """Remember where ``peer_id`` listens, so it can be named by its id alone."""
        addr = Multiaddr.parse(addr) if isinstance(addr, str) else addr
        self._addresses[peer_id] = addr.without_peer_id()

    def connection(self, peer_id: PeerId) -> Connection | None:
        """The pooled connection to ``peer_id``, if one is open."""
        group = self._conns.get(peer_id)
        if group is None:
            return None
        if len(group) == 1:  # the usual case: one connection per peer
            conn = group[0]
            return None if conn._closed is not None or conn.going_away else conn
        best = None
        for conn in group:
            if conn.is_closed or conn.going_away:
                continue
            if best is None or _preference(conn) < _preference(best):
                best = conn
        return best

    def connections(self) -> list[Connection]:
        """Every open connection (including ones being retired)."""
        return [c for group in self._conns.values() for c in group if not c.is_closed]

    async def connect(self, peer: PeerLike, *, timeout: float | None = None) -> Connection:
        """The connection to ``peer``: the pooled one, or a new dial (TCP + handshake).

        Raises ConnectionClosedError (cannot connect), DeadlineExceeded, or the
        handshake's RemoteProtocolError (SWARM_KEY_MISMATCH, PEER_ID_MISMATCH, ...).
        """
        tg = self._check_running()
        timeout = self.config.handshake_timeout if timeout is None else timeout
        peer_id, addr = _resolve(peer)
        if peer_id is not None:
            conn = self.connection(peer_id)
            if conn is not None:
                return conn
            if addr is None:
                addr = self._addresses.get(peer_id)
                if addr is None:
                    raise ConnectionClosedError(
                        f"no connection to {peer_id} and no known address: dial a multiaddr or call add_address first"
                    )
                addr = addr.with_peer_id(peer_id)
        assert addr is not None
        key: Any = peer_id if peer_id is not None else (addr.host, addr.port)
        fut = self._dials.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_consume_exception)
            self._dials[key] = fut
            task = tg.create_task(self._dial_into(addr, key, fut))
            self._dial_tasks.add(task)
            task.add_done_callback(self._dial_tasks.discard)
        try:
            async with asyncio.timeout(timeout):
                conn = await asyncio.shield(fut)
        except TimeoutError:
            raise DeadlineExceeded(f"connecting to {addr} took longer than {timeout} s") from None
        return self.connection(conn.peer_id) or conn

    async def _dial_into(self, addr: Multiaddr, key: Any, fut: asyncio.Future[Connection]) -> None:
        try:
            conn = await self._dial(addr)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            if not fut.done():
                fut.set_exception(exc)
        else:
            if not fut.done():
                fut.set_result(conn)
        finally:
            if self._dials.get(key) is fut:
                del self._dials[key]

    async def _dial(self, addr: Multiaddr) -> Connection:
        loop = asyncio.get_running_loop()
        wire = _Wire(
            identity=self.identity,
            swarm_key=self._swarm_key,
            initiator=True,
            config=self.config,
            on_ready=self._adopt,
            on_failed=self._dial_failed,
            expected_peer_id=addr.peer_id,
            budget=self._budget,
        )
        family = {"ip4": socket.AF_INET, "dns4": socket.AF_INET, "ip6": socket.AF_INET6, "dns6": socket.AF_INET6}.get(addr.kind, 0)
        assert wire.ready is not None
        try:
            async with asyncio.timeout(self.config.handshake_timeout):
                await loop.create_connection(lambda: wire, addr.host, addr.port, family=family)
                conn = await wire.ready
        except TimeoutError:
            wire.abort()
            raise DeadlineExceeded(f"connecting to {addr}: no finished handshake within {self.config.handshake_timeout} s") from None
        except asyncio.CancelledError:
            wire.ready.cancel()
            wire.abort()
            raise
        except OSError as exc:
            raise ConnectionClosedError(f"cannot connect to {addr}: {exc.strerror or exc}") from exc
        except RemoteProtocolError as exc:
            raise _with_hint(exc, f"connecting to {addr}: ") from exc
        if addr.peer_id is None or addr.peer_id == conn.peer_id:
            self._addresses[conn.peer_id] = addr.without_peer_id()
        return conn

    def _dial_failed(self, error: ProtocolError, peername: Any) -> None:
        self._handshakes_failed[_code_name(error.code)] += 1

    def _adopt(self, conn: Connection) -> None:
        """A handshake finished: pool the connection, start its keepalive, dedupe (§3.12)."""
        self._handshakes_completed += 1
        if not self._running or self._tg is None:
            conn.close(0, "host shutting down")
            return
        refusal = self._admission.open(conn.peer_id, inbound=not conn.initiator)
        if refusal is not None:
            self.warn("refused a connection", str(conn.peer_id), f"with {conn.peer_id}: too many {refusal} (spec/transport.md §3.16.2)")
            conn.close(ErrorCode.BUSY, f"too many {refusal} (spec/transport.md §3.16.2)")
            return
        conn.on_warning = self.warn
        conn.on_stream = self._on_stream
        conn.unary_servers = self._unary_servers
        conn.on_going_away = self._on_going_away
        conn.on_closed = self._on_closed
        group = self._conns.setdefault(conn.peer_id, [])
        group.append(conn)
        conn.start_keepalive(self._tg.create_task)
        best = self.connection(conn.peer_id)
        for other in group:
            if other is not best and not other.going_away and not other.is_closed:
                other.retire()

    def _on_going_away(self, conn: Connection) -> None:
        conn.retire()

    def _on_closed(self, conn: Connection) -> None:
        self._admission.close(conn.peer_id, inbound=not conn.initiator)
        stats = conn.statistics()
        self._closed_bytes[0] += stats.bytes_sent
        self._closed_bytes[1] += stats.bytes_received
        group = self._conns.get(conn.peer_id)
        if group is not None and conn in group:
            group.remove(conn)
            if not group:
                del self._conns[conn.peer_id]

    # ------------------------------------------------------------------ RPC

    async def open_stream(self, peer: PeerLike, protocol: str, *, timeout: float | None = None) -> Stream:
        """Open a stream for ``protocol`` to ``peer`` (connecting if needed, within ``timeout``).

        If the peer has no handler, the stream's first ``receive`` (or a later
        ``send``) raises ``UnknownProtocolError``.
        """
        timeout = self.config.call_timeout if timeout is None else timeout
        conn = await self.connect(peer, timeout=timeout)
        try:
            return conn.open_stream(protocol)
        except ConnectionClosedError:
            conn = await self.connect(conn.peer_id, timeout=timeout)  # lost a dedupe race: use the pooled one
            return conn.open_stream(protocol)

    async def call(self, peer: PeerLike, protocol: str, request: bytes, *, timeout: float | None = None) -> bytes:
        """Request/response RPC (§3.11): send ``request``, return the response, within ``timeout`` s.

        Raises DeadlineExceeded, UnknownProtocolError, StreamResetError (the handler
        raised; ``.code`` is its error code), ConnectionClosedError or a handshake error.
        """
        timeout = self.config.call_timeout if timeout is None else timeout
        # Fast path (module docstring): a pooled connection and a one-frame request. No task,
        # no asyncio.timeout: one future resolved by the receive path, the shared deadline timer.
        peer_id = peer if type(peer) is PeerId else _resolve(peer)[0]
        conn = self.connection(peer_id) if peer_id is not None else None
        size = len(request) if type(request) is bytes else memoryview(request).nbytes
        if conn is not None and 0 < size <= ONE_FRAME and not conn._write_paused:
            try:
                call = conn.open_unary(protocol, request, size, peer, timeout)
            except ConnectionClosedError:
                pass  # pooled connection retired a moment ago: the general path dials anew
            else:
                loop = conn._loop
                deadline = call.deadline = loop.time() + timeout
                self._watch_deadline(call, loop)
                try:
                    return await call.future
                except StreamResetError as exc:
                    if not _refused(exc, call.received):
                        raise
                    # The peer refused the stream while retiring this connection: once more, fresh.
                except asyncio.CancelledError:
                    if not call.is_closed:
                        call.reset(ErrorCode.TIMEOUT, "caller gave up")
                    raise
                finally:
                    call.finish()
                return await self._call_general(peer, protocol, request, max(0.0, deadline - loop.time()), attempts=1)
        return await self._call_general(peer, protocol, request, timeout)

    def _watch_deadline(self, reply: UnaryCall, loop: asyncio.AbstractEventLoop) -> None:
        """Expire ``reply`` at ``reply.deadline`` unless it finishes first (one timer for all calls)."""
        queue = self._deadlines
        while queue and not queue[0].active:
            queue.popleft()  # finished calls at the front
        if queue and reply.deadline < queue[-1].deadline:
            # Out of order (a shorter timeout than an earlier call's): a timer of its own.
            reply.timer = loop.call_at(reply.deadline, self._expire_one, reply)
            return
        queue.append(reply)
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(reply.deadline, self._check_deadlines, loop)
        elif len(queue) >= self._compact_deadlines_at:
            # A slow call at the front keeps finished ones behind it: drop them now and then.
            self._deadlines = queue = deque(r for r in queue if r.active)
            self._compact_deadlines_at = max(_COMPACT_DEADLINES, 2 * len(queue))

    def _check_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        """The shared deadline timer fired: expire every call past its deadline, re-arm for the next."""
        self._deadline_timer = None
        queue = self._deadlines
        now = loop.time()
        while queue:
            reply = queue[0]
            if not reply.active:
                queue.popleft()
            elif reply.deadline <= now:
                queue.popleft()
                reply.expire()
            else:
                self._deadline_timer = loop.call_at(reply.deadline, self._check_deadlines, loop)
                return

    @staticmethod
    def _expire_one(reply: UnaryCall) -> None:
        reply.timer = None
        reply.expire()

    async def _call_general(
        self, peer: PeerLike, protocol: str, request: bytes, timeout: float, *, attempts: int = 2, stream: Stream | None = None
    ) -> bytes:
        """``call`` for every case: dial if needed, any request size (waits for windows), one retry."""
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(attempts):
                    if stream is None:
                        peer_id = peer if isinstance(peer, PeerId) else _resolve(peer)[0]
                        conn = self.connection(peer_id) if peer_id is not None else None
                        if conn is None:
                            conn = await self.connect(peer, timeout=timeout)
                        try:
                            stream = conn.open_stream(protocol, _flush=False)
                        except ConnectionClosedError:
                            if attempt == attempts - 1:
                                raise
                            continue  # pooled connection retired a moment ago: the next one is fresh
                    try:
                        return await _call_on(stream, request)
                    except StreamResetError as exc:
                        if attempt < attempts - 1 and _refused(exc, stream.statistics().messages_received > 0):
                            stream = None
                            continue  # the peer refused the stream while retiring this connection
                        raise
                raise AssertionError("unreachable")
        except TimeoutError:
            raise DeadlineExceeded(f"call {protocol} to {peer} did not complete within {timeout} s") from None

    # ------------------------------------------------------------------ statistics

    def statistics(self) -> HostStatistics:
        conns = self.connections()
        stats = [c.statistics() for c in conns]
        return HostStatistics(
            peer_id=self.peer_id,
            listen_addrs=tuple(str(a) for a in self.addrs),
            connections=len(conns),
            inbound=sum(not s.initiator for s in stats),
            outbound=sum(s.initiator for s in stats),
            streams_open=sum(s.streams_open for s in stats),
            handlers_running=sum(not t.done() for t in self._handler_tasks),
            dials_in_progress=len(self._dials),
            handshakes_in_progress=len(self._handshaking),
            handshakes_completed=self._handshakes_completed,
            handshakes_failed=dict(self._handshakes_failed),
            bytes_sent=self._closed_bytes[0] + sum(s.bytes_sent for s in stats),
            bytes_received=self._closed_bytes[1] + sum(s.bytes_received for s in stats),
            inline_requests=self._inline_requests,
            receive_buffer_held=self._budget.held,
            messages_refused=self._budget.refused,
        )

    # ------------------------------------------------------------------ inline handlers

    def _serve_inline(self, handler: InlineHandler, stream: Stream, request: bytes) -> None:
        """Run an inline handler on a complete request and queue its response (set_inline_handler).

        Runs inside the connection's receive path: nothing may escape from here, or the
        multiplexer would take the exception for the peer's fault and close the connection.
        """
        self._inline_requests += 1
        try:
            response = handler(stream._conn.peer_id, request)
        except Exception as exc:
            _handler_failed(stream, exc)
            return
        if not _usable_response(stream, response):
            return
        try:
            if stream._try_send_last(response):
                return
        except ProtocolError:  # the stream or connection went away under us
            return
        # Bigger than the peer's window: send it as an async handler would, in a task.
        if self._running and self._tg is not None:
            task = stream._conn._loop.create_task(self._send_response(stream, response))
            stream._task_to_cancel = task
            self._handler_tasks.add(task)

    async def _send_response(self, stream: Stream, response: bytes | bytearray | memoryview) -> None:
        try:
            await stream.send(response, end=True)
        except (TransportError, RemoteProtocolError):
            pass  # stream reset or connection gone: nobody to answer
        except asyncio.CancelledError:
            stream.reset(ErrorCode.CONNECTION_CLOSED, "peer is shutting down")
            raise
        except Exception:
            log.exception("answering %s failed", stream.protocol)
            stream.reset(ErrorCode.INTERNAL, f"internal error serving {stream.protocol}")
        finally:
            self._handler_tasks.discard(stream._task_to_cancel)  # type: ignore[arg-type]


def _handler_failed(stream: Stream | UnaryRequest, exc: Exception) -> None:
    """A unary handler raised: a ProtocolError answers with its code, anything else (logged) INTERNAL."""
    if isinstance(exc, ProtocolError):
        stream.reset(exc.code, exc.message)
        return
    log.error("handler for %s failed", stream.protocol, exc_info=exc)
    stream.reset(ErrorCode.INTERNAL, f"internal error in the handler for {stream.protocol}")


def _usable_response(stream: Stream | UnaryRequest, response: object) -> bool:
    """A handler's return value is a message (1 to MAX_FRAME_BYTES bytes); else log it, answer INTERNAL."""
    if isinstance(response, (bytes, bytearray, memoryview)) and 1 <= len(response) <= MAX_FRAME_BYTES:
        return True
    if inspect.iscoroutine(response):
        response.close()  # an async function registered as inline: say so, without a never-awaited warning
    log.error("handler for %s returned %r, not 1 to %d bytes", stream.protocol, type(response).__name__, MAX_FRAME_BYTES)
    stream.reset(ErrorCode.INTERNAL, f"internal error in the handler for {stream.protocol}")
    return False


def _refused(exc: StreamResetError, received: bool) -> bool:
    """The peer refused the stream (GO_AWAY sent): retrying on a fresh connection is safe."""
    return exc.by_peer and exc.code == ErrorCode.CONNECTION_CLOSED and not received


async def _call_on(stream: Stream, request: bytes) -> bytes:
    """Client side of §3.11 on an open stream; resets the stream on any failure."""
    try:
        await stream.send(request, end=True)
        return await stream.receive_only()
    except BaseException as exc:
        if not stream.is_closed:
            cancelled = isinstance(exc, asyncio.CancelledError)
            stream.reset(ErrorCode.TIMEOUT if cancelled else ErrorCode.STREAM_RESET, "caller gave up" if cancelled else "")
        raise


def _preference(conn: Connection) -> tuple[bytes, bytes]:
    """Both peers rank a pair's connections alike: dialled by the smaller peer id first (§3.12)."""
    dialer = conn.local_peer_id if conn.initiator else conn.peer_id
    return (dialer.to_bytes(), conn.handshake_hash)


def _resolve(peer: PeerLike) -> tuple[PeerId | None, Multiaddr | None]:
    if isinstance(peer, PeerId):
        return peer, None
    if isinstance(peer, str):
        known = _PARSED.get(peer)
        if known is not None:
            return known
        if peer.startswith("/"):
            addr = Multiaddr.parse(peer)
            result: tuple[PeerId | None, Multiaddr | None] = (addr.peer_id, addr)
        else:
            result = (PeerId.from_base58(peer), None)
        if len(_PARSED) >= 1024:  # parsing base58 costs ~100 us; callers reuse a few strings
            _PARSED.clear()
        _PARSED[peer] = result
        return result
    if isinstance(peer, Multiaddr):
        return peer.peer_id, peer
    raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"a peer is a PeerId, Multiaddr or multiaddr string, not {type(peer).__name__}")


_PARSED: dict[str, tuple[PeerId | None, Multiaddr | None]] = {}


def _check_protocol(protocol: str) -> str:
    try:
        validate_protocol_name(protocol.encode("ascii"))
    except (UnicodeEncodeError, AttributeError, RemoteProtocolError):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"invalid protocol name {protocol!r}: visible ASCII starting with '/', at most 128 bytes") from None
    return protocol


def _with_hint(error: ProtocolError, prefix: str = "") -> ProtocolError:
    hint = _HINTS.get(error.code, "") if isinstance(error.code, ErrorCode) else ""
    if not prefix and not hint:
        return error
    new = type(error)(error.code, f"{prefix}{error.message}{hint}") if type(error) in (RemoteProtocolError,) else error
    return new


def _code_name(code: ErrorCode | int) -> str:
    return code.name if isinstance(code, ErrorCode) else str(code)


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: a dial nobody waits for any more must not warn
