"""The node's session state machine: every rule of a node's inference sessions, without I/O.

See spec/messages.md §5.1 (opening: model, span, adapter, ``max_length``, cache budget),
§5.3 (a step's checks, in order), §5.6 (positions and masks; a ``truncate`` step rolls the
cache back to its ``position`` first, and a duplicate never does), §5.7 (push and
duplicates), §5.8 (closing), §5.9 (lifetime: idle timeout, a client that leaves; §5.9.1
``KeepAlive`` and its bound), §5.10 (chain binding: who may drive a session) and §2.6 (a failed step answers ``Error`` and
changes nothing). Sans-IO, as h11 and aioquic are: no asyncio, no sockets, no clock.
Time is an argument (``now``, seconds on the caller's monotonic clock); the caller asks
``get_timer()`` and calls ``handle_timer(now)``.

``SessionMachine`` owns every session's state (``node.sessions.Session``): its span,
the positions and masks its cache holds, its cache reservation (``CacheBudget``), the
last step id it processed, the steps waiting for it (at most one runs at a time), its
idle deadline and its closing. It takes decoded messages and returns actions, in the
order the caller must perform them:

* ``Allocate``: allocate the cache of an opening session, then call ``allocated`` (or
  ``allocation_failed``);
* ``RunStep``: compute a checked step (a frozen ``models.step.SpanStep``), then call
  ``step_done`` or ``step_failed``;
* ``Send``: send a message on a stream (a reply, a ``StepResult``, a typed ``Error``);
* ``PushTo``: push the step's output to the next hop of the chain (§5.7);
* ``EndStream``: the machine is done with a stream; the driver stops reading it.

Streams are named by the caller (any hashable value: the machine only hands them back
in actions). node/handler.py is the asyncio driver that moves the messages and runs
these actions. Who may drive a session is decided here too (§5.10): every event names the
authenticated peer it came from (``peer``). ``Step``, ``CloseSession``, ``SetUpstream`` and ``KeepAlive``
count only on the session stream of the session they name, which is the owner's; a ``Push``
counts only from the session's ``upstream`` (named by ``OpenSession``, replaced by the
owner's ``SetUpstream``). Anything else is refused with a typed ``Error`` to its sender and
changes nothing: no cache, step id or idle-time change, nothing sent to the owner.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Union

import torch

from biopetals.node.budget import CacheBudget
from biopetals.node.sessions import Checked, Session
from biopetals.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from biopetals.protocol.messages import (
    Backward,
    CloseSession,
    Error,
    Forward,
    Hop,
    KeepAlive,
    Message,
    OpenSession,
    Push,
    PushAck,
    SessionClosed,
    SessionOpened,
    SetUpstream,
    Step,
    StepResult,
    error_from_exception,
)
from biopetals.protocol.tensors import Codec

__all__ = [
    "Action", "Allocate", "EndStream", "NodeRules", "PushTo", "RunStep", "Send", "SessionMachine",
]


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, eq=False)
class Send:
    """Send ``message`` on stream ``to`` (encoded with ``codec`` when it carries tensors)."""

    to: Hashable
    message: Message
    codec: Codec | None = None


@dataclass(frozen=True)
class EndStream:
    """The machine is done with stream ``to``: stop reading it and close it."""

    to: Hashable


@dataclass(frozen=True)
class Allocate:
    """Allocate the KV cache of an opening session (its bytes are reserved already)."""

    session_id: bytes
    start: int
    end: int
    batch_size: int
    max_length: int


@dataclass(frozen=True, eq=False)
class RunStep:
    """Compute ``step`` on blocks ``[start, end)`` into ``cache``; its results go back as ``step_done``."""

    session_id: bytes
    step_id: int
    start: int
    end: int
    cache: Any
    step: Any  # models.step.SpanStep
    codec: Codec
    adapter: str | None


@dataclass(frozen=True, eq=False)
class PushTo:
    """Send ``push`` to the node ``hop`` names (spec/messages.md §5.7); its answer changes nothing here."""

    hop: Hop
    push: Push
    codec: Codec


Action = Union[Send, EndStream, Allocate, RunStep, PushTo]


# ----------------------------------------------------------------------------- rules of the node


@dataclass(frozen=True)
class NodeRules:
    """What the node serves and its limits: the checks of a request that need no session."""

    model: str  # the swarm model name (models.config.ModelInfo.dht_prefix)
    start: int
    end: int
    hidden_size: int
    max_positions: int  # the model's positions (config, or sliding window)
    adapters: tuple[str, ...] = ()
    idle_timeout: float = 60.0
    #: Longest time keepalives alone hold a session after its last Step/Push (§5.9.1); then it closes as idle.
    max_keepalive_hold: float = 1800.0
    #: Most tokens (batch x tokens) in one Forward/Backward; above: LIMIT_EXCEEDED.
    max_forward_tokens: int = 8192
    #: Most messages waiting for one session behind its running step; above: BUSY.
    max_queued_steps: int = 16

    def check_request(self, model: str, start: int, end: int, adapter: str | None = None) -> None:
        """Model, span and adapter of an ``OpenSession``, ``Forward`` or ``Backward`` (§5.1, §6)."""
        if model != self.model:
            raise RemoteProtocolError(ErrorCode.MODEL_MISMATCH, f"this node serves model {self.model!r}, not {model!r}")
        if not (self.start <= start and end <= self.end):
            raise RemoteProtocolError(
                ErrorCode.BLOCKS_NOT_SERVED,
                f"blocks [{start}, {end}) requested; this node serves [{self.start}, {self.end})",
            )
        if adapter is not None and adapter not in self.adapters:
            held = ", ".join(self.adapters) or "none"
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_ADAPTER, f"adapter {adapter!r} is not loaded on this node (it holds: {held})"
            )

    def check_stateless(self, request: Forward | Backward) -> None:
        """A ``Forward``/``Backward`` this node can run (spec/messages.md §6.1, §6.2)."""
        self.check_request(request.model, request.start, request.end, request.adapter)
        batch, tokens, hidden_size = request.hidden.shape
        if hidden_size != self.hidden_size:
            raise RemoteProtocolError(
                ErrorCode.HIDDEN_SIZE_MISMATCH, f"hidden size {hidden_size}; this model's is {self.hidden_size}"
            )
        if batch * tokens > self.max_forward_tokens:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{batch} x {tokens} tokens in one request; this node takes at most {self.max_forward_tokens}",
            )
        if tokens > self.max_positions:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"{tokens} tokens > the model's {self.max_positions} positions"
            )


# ----------------------------------------------------------------------------- the machine


class SessionMachine:
    """Every session of one node's span, and every transition between their states (module doc)."""

    def __init__(self, rules: NodeRules, budget: CacheBudget, cache_bytes: Callable[[int, int, int, int], int]) -> None:
        """``cache_bytes(start, end, batch_size, max_length)``: the KV-cache size of a session."""
        self.rules = rules
        self.budget = budget
        self.cache_bytes = cache_bytes
        self._sessions: dict[bytes, Session] = {}
        self._by_stream: dict[Hashable, Session] = {}

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        """Open sessions (``sessions_open``, §4.2)."""
        return sum(1 for s in self._sessions.values() if s.is_open)

    def __contains__(self, session_id: bytes) -> bool:
        return self._open(session_id) is not None

    def sessions(self) -> list[Session]:
        return [s for s in self._sessions.values() if s.is_open]

    def serves(self, stream: Hashable) -> bool:
        """``stream`` is the stream of a session that has not ended: keep reading it."""
        return stream in self._by_stream

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must run next: the earliest idle deadline (None: no session is idle)."""
        deadlines = [self._deadline(s) for s in self.sessions() if not s.busy]
        return min(deadlines, default=None)

    # ------------------------------------------------------------------ opening (§5.1, §5.2)

    def open(self, stream: Hashable, peer: Any, request: OpenSession, now: float, fresh_id: bytes) -> list[Action]:
        """An ``OpenSession`` starting ``stream``; ``fresh_id``: the id to use if the client names none."""
        session_id = request.session_id if request.session_id is not None else fresh_id
        try:
            if session_id in self._sessions:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_FIELD, f"a session with id {session_id.hex()} is already open on this node"
                )
            self.rules.check_request(request.model, request.start, request.end, request.adapter)
            if request.max_length > self.rules.max_positions:
                raise RemoteProtocolError(
                    ErrorCode.LIMIT_EXCEEDED,
                    f"max_length {request.max_length} > the model's {self.rules.max_positions} positions",
                )
            nbytes = self.cache_bytes(request.start, request.end, request.batch_size, request.max_length)
            self.budget.reserve(session_id, nbytes, peer)
        except ProtocolError as exc:
            return [Send(stream, error_from_exception(exc)), EndStream(stream)]
        session = Session(
            session_id=session_id, start=request.start, end=request.end, batch_size=request.batch_size,
            max_length=request.max_length, codec=request.codec, adapter=request.adapter, owner=stream, peer=peer,
            upstream=request.upstream, last_activity=now, last_work=now,
        )
        self._sessions[session_id] = session
        self._by_stream[stream] = session
        return [Allocate(session_id, request.start, request.end, request.batch_size, request.max_length)]

    def allocated(self, session_id: bytes, cache: Any, now: float) -> list[Action]:
        """The cache of an opening session is ready: the session is open."""
        session = self._sessions.get(session_id)
        if session is None or session.is_open:
            return []  # closed meanwhile (the node is stopping): the cache is dropped
        session.cache, session.is_open = cache, True
        session.touch(now)
        opened = SessionOpened(session_id=session_id, idle_timeout=self.rules.idle_timeout, upstream=session.upstream,
                               rollback=1,  # this node accepts ``truncate`` (§5.6, revision 4)
                               keepalive=1)  # and ``KeepAlive`` (§5.9.1, revision 5)
        return [Send(session.owner, opened)]

    def allocation_failed(self, session_id: bytes, error: Error) -> list[Action]:
        """The cache could not be allocated: free the reservation, answer ``error`` (``CACHE_BUDGET``)."""
        session = self._sessions.get(session_id)
        if session is None:
            return []
        self._remove(session)
        return [Send(session.owner, error), EndStream(session.owner)]

    # ------------------------------------------------------------------ session stream (§5.3, §5.8)

    def receive(self, stream: Hashable, message: Step | CloseSession | SetUpstream | KeepAlive,
                now: float) -> list[Action]:
        """A ``Step``, ``CloseSession``, ``SetUpstream`` or ``KeepAlive`` on the session stream ``stream``
        (the owner's)."""
        session = self._by_stream.get(stream)
        if session is None or not session.is_open:
            return []  # the session ended: the driver stops reading this stream
        step_id = message.step_id if isinstance(message, Step) else None
        if message.session_id != session.session_id:
            return [Send(stream, Error(
                code=ErrorCode.UNKNOWN_SESSION, message=f"session {message.session_id.hex()} is not open on this stream",
                step_id=step_id,
            ))]
        if isinstance(message, SetUpstream):
            session.upstream = message.upstream  # pushes from now on (§5.10); no reply
            return []
        if isinstance(message, KeepAlive):
            session.keep_alive(now)  # the idle clock restarts, within max_keepalive_hold (§5.9.1); no reply
            return []
        if isinstance(message, Step):
            session.touch(now)
        busy = self._busy(session, step_id)
        if busy is not None:
            return [Send(stream, busy)]
        session.inbox.append(message)
        return self._advance(session)

    def stream_closed(self, stream: Hashable) -> list[Action]:
        """The session stream or its connection closed (the client left): free the session (§5.9)."""
        session = self._by_stream.get(stream)
        if session is not None:
            self._remove(session)
        return []

    # ------------------------------------------------------------------ push (§5.7)

    def push(self, stream: Hashable, peer: Any, push: Push, now: float) -> list[Action]:
        """A ``Push`` arriving on request stream ``stream``: acknowledge it at once, queue it."""
        session = self._open(push.session_id)
        if session is None:
            return [Send(stream, self._unknown(push.session_id, push.step_id))]
        if session.upstream is None or peer != session.upstream:
            return [Send(stream, self._forbidden(session, peer, push.step_id))]
        busy = self._busy(session, push.step_id)
        if busy is not None:
            return [Send(stream, busy)]
        session.touch(now)
        actions: list[Action] = [Send(stream, PushAck(session_id=push.session_id, step_id=push.step_id))]
        if session.is_duplicate(push.step_id):
            return actions
        session.inbox.append(push)
        return actions + self._advance(session)

    # ------------------------------------------------------------------ steps (§5.3, §5.5, §2.6)

    def step_done(self, session_id: bytes, step_id: int, out: torch.Tensor, now: float) -> list[Action]:
        """``RunStep`` computed ``out``: commit the step, push it on, answer the client."""
        session, checked = self._finished(session_id, step_id)
        if session is None:
            return []
        session.commit(checked, now)
        message = checked.message
        actions: list[Action] = []
        if message.next:
            push = Push(
                session_id=message.next[0].session_id, step_id=step_id, position=message.position, hidden=out,
                prompts=checked.rest, next=message.next[1:],
                mask=message.mask,  # every span of the chain pads the same tokens (§5.3)
                truncate=message.truncate,  # every span of the chain rolls back alike (§5.6)
            )
            actions.append(PushTo(message.next[0], push, session.codec))
        actions.append(Send(session.owner, StepResult(session_id=session_id, step_id=step_id, hidden=out), session.codec))
        return actions + self._advance(session)

    def step_failed(self, session_id: bytes, step_id: int, error: Error) -> list[Action]:
        """``RunStep`` failed: the session is as it was before the step (§2.6); the owner gets ``error``."""
        session, _ = self._finished(session_id, step_id)
        if session is None:
            return []
        return [Send(session.owner, error)] + self._advance(session)

    # ------------------------------------------------------------------ time (§5.9)

    def handle_timer(self, now: float) -> list[Action]:
        """Close every session idle at ``now`` (§5.9): no ``Step``, ``Push`` or ``KeepAlive`` for
        ``idle_timeout``, or kept alive by keepalives alone for ``max_keepalive_hold``: ``TIMEOUT`` on its stream."""
        actions: list[Action] = []
        rules = self.rules
        for session in self.sessions():
            if not session.busy and now >= self._deadline(session):
                self._remove(session)
                timeout = f"session idle for {rules.idle_timeout:g} s: closed"
                if now < session.last_activity + rules.idle_timeout:
                    timeout = (f"session kept alive without a Step or Push for {rules.max_keepalive_hold:g} s "
                               "(the node's max keepalive hold): closed as idle")
                actions += [Send(session.owner, Error(code=ErrorCode.TIMEOUT, message=timeout)), EndStream(session.owner)]
        return actions

    def close_all(self) -> list[Action]:
        """The node stops: free every session (their streams close with the connections)."""
        for session in list(self._sessions.values()):
            self._remove(session)
        return []

    # ------------------------------------------------------------------ internals

    def _advance(self, session: Session) -> list[Action]:
        """Start the next waiting message of ``session`` if none runs: one step at a time, in order."""
        actions: list[Action] = []
        while session.running is None and session.inbox:
            message = session.inbox.popleft()
            if isinstance(message, CloseSession):
                self._remove(session)
                return actions + [Send(session.owner, SessionClosed(session_id=session.session_id)),
                                  EndStream(session.owner)]
            if session.is_duplicate(message.step_id):
                continue  # processed already: its StepResult was sent (§5.7)
            try:
                checked = session.check_step(message, self.rules.hidden_size)
            except ProtocolError as exc:
                actions.append(Send(session.owner, error_from_exception(exc, message.step_id)))
                continue
            session.running = checked
            actions.append(RunStep(
                session.session_id, message.step_id, session.start, session.end, session.cache, checked.step,
                session.codec, session.adapter,
            ))
        return actions

    def _finished(self, session_id: bytes, step_id: int) -> tuple[Session | None, Checked | None]:
        session = self._open(session_id)
        if session is None or session.running is None or session.running.message.step_id != step_id:
            return None, None  # closed while the step ran: its result goes nowhere
        checked, session.running = session.running, None
        return session, checked

    def _deadline(self, session: Session) -> float:
        return session.idle_deadline(self.rules.idle_timeout, self.rules.max_keepalive_hold)

    def _busy(self, session: Session, step_id: int | None) -> Error | None:
        """``BUSY`` when ``max_queued_steps`` messages already wait for ``session``."""
        if len(session.inbox) < self.rules.max_queued_steps:
            return None
        busy = f"{len(session.inbox)} messages already wait for this session; retry later"
        return Error(code=ErrorCode.BUSY, message=busy, step_id=step_id)

    def _open(self, session_id: bytes) -> Session | None:
        session = self._sessions.get(session_id)
        return session if session is not None and session.is_open else None

    @staticmethod
    def _unknown(session_id: bytes, step_id: int | None) -> Error:
        return Error(
            code=ErrorCode.UNKNOWN_SESSION, step_id=step_id,
            message=f"session {session_id.hex()} is not open on this node (never opened, closed or expired)",
        )

    @staticmethod
    def _forbidden(session: Session, peer: Any, step_id: int) -> Error:
        """§5.10: a ``Push`` from a peer that is not the session's upstream; the session is untouched."""
        allowed = f"only {session.upstream}" if session.upstream is not None else "no peer"
        return Error(
            code=ErrorCode.FORBIDDEN, step_id=step_id,
            message=f"peer {peer} may not push into session {session.session_id.hex()}: its owner allows {allowed} "
                    "(spec/messages.md §5.10)",
        )

    def _remove(self, session: Session) -> None:
        """Forget ``session`` and free its reservation (the cache goes when no step holds it)."""
        self._sessions.pop(session.session_id, None)
        if self._by_stream.get(session.owner) is session:
            del self._by_stream[session.owner]
        self.budget.release(session.session_id)
        session.is_open = False
        session.inbox.clear()
        session.cache = None
