"""The node's side of the node protocol: the asyncio driver of ``/biopetals/node/2``.

See spec/messages.md §2.1 (stream kinds), §4 (node info), §5 (sessions, push), §6
(forward/backward) and §7 (errors). The first message of a stream decides its kind:
``NodeInfoRequest``, ``Push``, ``Forward`` and ``Backward`` get one reply and the
stream ends; ``OpenSession`` starts a session stream that carries ``Step``, ``SetUpstream``,
``KeepAlive`` and ``CloseSession`` until the session ends.

Every rule of a session lives in the sans-IO ``SessionMachine`` (node/session_machine.py);
this module only moves messages into it, performs the actions it returns (send,
allocate, run a step on ``node/backend.py``, push to the next node, end a stream) and
keeps its one timer (``get_timer``/``handle_timer``). Every rule broken by a peer is
answered with the spec's typed ``Error`` and the node keeps serving (§2.6).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

from biopetals.node.backend import Backend
from biopetals.node.budget import CacheBudget
from biopetals.node.session_machine import (
    Action,
    Allocate,
    EndStream,
    NodeRules,
    PushTo,
    RunStep,
    Send,
    SessionMachine,
)
from biopetals.node.fair_queue import current_peer
from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.messages import (
    Backward,
    BackwardResult,
    CloseSession,
    Error,
    Forward,
    ForwardResult,
    KeepAlive,
    Message,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
    Push,
    PushAck,
    SetUpstream,
    Step,
    decode_message,
    encode_message,
    error_from_exception,
)
from biopetals.protocol.tensors import Codec
from biopetals.transport.addresses import hop_target
from biopetals.transport.errors import EndOfStream, TransportError
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

__all__ = ["NodeService", "ServiceConfig"]

log = logging.getLogger("biopetals.node")

_FIRST = (NodeInfoRequest, OpenSession, Push, Forward, Backward)
_ON_SESSION = (Step, CloseSession, SetUpstream, KeepAlive)


@dataclass(frozen=True)
class ServiceConfig:
    """What the node serves and its limits."""

    model: str  # the swarm model name (models.config.ModelInfo.dht_prefix)
    version: str
    dtype: str
    quant: str
    idle_timeout: float = 60.0  # these three become the machine's NodeRules
    max_forward_tokens: int = 8192
    max_keepalive_hold: float = 1800.0
    #: Deadline for a server-to-server push (connect + PushAck).
    push_timeout: float = 10.0


#: Typed Error replies sent by every service of this process, by code name (node/metrics.py reads it).
error_replies: collections.Counter[str] = collections.Counter()


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


class _Sender:
    """Serialises sends on one stream (the machine names streams by their sender)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._lock = asyncio.Lock()

    async def send(self, message: Message, codec: Codec | None = None) -> bool:
        """Send; False if the stream or connection is gone (the client left)."""
        data = encode_message(message, codec)
        if isinstance(message, Error):
            error_replies[_code_name(message.code)] += 1
        async with self._lock:
            try:
                await self.stream.send(data)
                return True
            except (TransportError, RemoteProtocolError):
                return False


class NodeService:
    """Serves ``/biopetals/node/2`` on a ``Host`` with a ``Backend``."""

    def __init__(
        self,
        host: Host,
        backend: Backend,
        budget: CacheBudget,
        config: ServiceConfig,
        *,
        throughput: tuple[float, float] = (0.0, 0.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.backend = backend
        self.budget = budget
        self.config = config
        self.throughput = throughput  # (inference tokens/s, forward tokens/s)
        self.clock = clock
        span = backend.span
        self.rules = NodeRules(
            model=config.model, start=span.start, end=span.end, hidden_size=span.hidden_size,
            max_positions=span.max_length, adapters=tuple(backend.adapters.names), idle_timeout=config.idle_timeout,
            max_forward_tokens=config.max_forward_tokens, max_keepalive_hold=config.max_keepalive_hold,
        )
        self.sessions = SessionMachine(self.rules, budget, backend.cache_bytes)
        self.started = clock()
        self._tasks: set[asyncio.Task] = set()
        self._receiving: dict[_Sender, asyncio.Timeout] = {}  # session streams waiting for a message
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: The service this one replaced when the node moved to other blocks (node/relocation.py),
        #: still finishing its sessions: pushes for them go there.
        self.previous: NodeService | None = None

    def install(self) -> None:
        self.host.set_stream_handler(PROTOCOL_NAME, self.handle_stream)

    @property
    def span(self):
        return self.backend.span

    def node_info(self) -> NodeInfo:
        return NodeInfo(
            version=self.config.version,
            model=self.config.model,
            start=self.span.start,
            end=self.span.end,
            dtype=self.config.dtype,
            quant=self.config.quant,
            hidden_size=self.span.hidden_size,
            cache_tokens_left=self.budget.tokens_left,
            inference_tps=float(self.throughput[0]),
            forward_tps=float(self.throughput[1]),
            sessions_open=len(self.sessions),
            decode_steps=self.backend.stats.decode_steps,
            batched_steps=self.backend.stats.batched_steps,
            uptime=max(0.0, float(self.clock() - self.started)),
            adapters=self.backend.adapters.names,
            rollback=1,  # sessions accept ``Step.truncate`` (spec/messages.md §5.6, revision 4)
            keepalive=1,  # and ``KeepAlive`` (§5.9.1, revision 5)
        )

    # ------------------------------------------------------------------ streams

    async def handle_stream(self, peer_id: PeerId, stream: Stream) -> None:
        """Host stream handler: the first message decides the stream's kind (§2.1)."""
        current_peer.set(peer_id)  # whose compute this stream queues (node/fair_queue.py)
        sender = _Sender(stream)
        try:
            data = await stream.receive()
        except (EndOfStream, TransportError, RemoteProtocolError):
            return  # nothing to answer: a framing error already reset the stream
        try:
            message = decode_message(data, _FIRST)
        except RemoteProtocolError as exc:
            await sender.send(error_from_exception(exc))
            return
        previous = self.previous
        if isinstance(message, Push) and previous is not None and message.session_id in previous.sessions:
            await previous._serve_first(peer_id, message, stream, sender)
            return
        await self._serve_first(peer_id, message, stream, sender)

    async def _serve_first(self, peer_id: PeerId, message: Message, stream: Stream, sender: _Sender) -> None:
        try:
            if isinstance(message, NodeInfoRequest):
                await sender.send(self.node_info())
            elif isinstance(message, OpenSession):
                await self._serve_session(peer_id, message, stream, sender)
            elif isinstance(message, Push):
                await self._serve_push(peer_id, message, sender)
            elif isinstance(message, Forward):
                await sender.send(await self._forward(message), message.codec)
            elif isinstance(message, Backward):
                await sender.send(await self._backward(message), message.codec)
        except ProtocolError as exc:
            await sender.send(error_from_exception(exc, getattr(message, "step_id", None)))
        except Exception as exc:  # a bug or an OOM: answer INTERNAL, keep serving
            log.exception("request %s failed", type(message).__name__)
            await sender.send(Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}"))

    # ------------------------------------------------------------------ forward / backward (§6)

    async def _forward(self, request: Forward) -> ForwardResult:
        self.rules.check_stateless(request)
        view = self.backend.view(request.start, request.end)
        out = await self.backend.run_forward(
            view, request.hidden, request.prompts, request.codec, request.mask, request.adapter, self.budget
        )
        return ForwardResult(hidden=out)

    async def _backward(self, request: Backward) -> BackwardResult:
        self.rules.check_stateless(request)
        view = self.backend.view(request.start, request.end)
        grad_inputs, grad_prompts = await self.backend.run_backward(
            view, request.hidden, request.grad_outputs, request.prompts, request.codec, request.mask, request.adapter
        )
        return BackwardResult(grad_inputs=grad_inputs, grad_prompts=grad_prompts)

    # ------------------------------------------------------------------ sessions (§5): moving messages

    async def _serve_session(self, peer_id: PeerId, request: OpenSession, stream: Stream, sender: _Sender) -> None:
        """One session stream, from ``OpenSession`` until the machine ends it or the client leaves."""
        try:
            await self._perform(self.sessions.open(sender, peer_id, request, self.clock(), os.urandom(16)))
            while self.sessions.serves(sender):
                try:
                    async with asyncio.timeout(None) as waiting:  # EndStream wakes it (``_end``)
                        self._receiving[sender] = waiting
                        data = await stream.receive()
                except TimeoutError:
                    return  # the machine ended the stream (idle timeout)
                except (EndOfStream, TransportError, RemoteProtocolError):
                    return  # the client left (or broke the framing): free the cache (§5.9)
                finally:
                    self._receiving.pop(sender, None)
                try:
                    message = decode_message(data, _ON_SESSION)
                except RemoteProtocolError as exc:
                    await sender.send(error_from_exception(exc))
                    continue
                await self._perform(self.sessions.receive(sender, message, self.clock()))
        finally:
            self.sessions.stream_closed(sender)
            self._arm_timer()

    async def _serve_push(self, peer_id: PeerId, push: Push, sender: _Sender) -> None:
        """§5.7: the reply (``PushAck`` or ``Error``) goes at once; the step runs after, in a task."""
        actions = self.sessions.push(sender, peer_id, push, self.clock())
        await self._perform(a for a in actions if isinstance(a, Send) and a.to is sender)
        rest = [a for a in actions if not (isinstance(a, Send) and a.to is sender)]
        if rest:
            self._spawn(self._perform(rest))

    # ------------------------------------------------------------------ sessions: performing actions

    async def _perform(self, actions: Iterable[Action]) -> None:
        """Perform the machine's actions in order, with those that computing a step returns."""
        todo = deque(actions)
        while todo:
            action = todo.popleft()
            if isinstance(action, Send):
                await action.to.send(action.message, action.codec)
            elif isinstance(action, PushTo):
                self._spawn(self._push(action.hop, action.push, action.codec))
                await asyncio.sleep(0)  # let the push go out first: the next node's compute is the critical path
            elif isinstance(action, RunStep):
                todo.extend(await self._run_step(action))
            elif isinstance(action, Allocate):
                todo.extend(await self._allocate(action))
            elif isinstance(action, EndStream):
                self._end(action.to)
        self._arm_timer()

    async def _run_step(self, run: RunStep) -> list[Action]:
        view = self.backend.view(run.start, run.end)
        try:
            out = await self.backend.run_step(view, run.cache, run.step, run.codec, run.adapter,
                                              alive=lambda: run.session_id in self.sessions)  # a long step's chunks
        except ProtocolError as exc:  # BUSY, NON_FINITE: the session is as it was (§2.6)
            return self.sessions.step_failed(run.session_id, run.step_id, error_from_exception(exc, run.step_id))
        except Exception as exc:
            log.exception("step failed")
            internal = Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}", step_id=run.step_id)
            return self.sessions.step_failed(run.session_id, run.step_id, internal)
        return self.sessions.step_done(run.session_id, run.step_id, out, self.clock())

    async def _allocate(self, allocate: Allocate) -> list[Action]:
        try:
            cache = await self.backend.run(
                self.backend.allocate, allocate.start, allocate.end, allocate.batch_size, allocate.max_length
            )
        except (MemoryError, RuntimeError) as exc:
            error = Error(code=ErrorCode.CACHE_BUDGET, message=f"could not allocate the KV cache: {exc}")
            return self.sessions.allocation_failed(allocate.session_id, error)
        except ProtocolError as exc:  # BUSY
            return self.sessions.allocation_failed(allocate.session_id, error_from_exception(exc))
        except BaseException:
            self.sessions.allocation_failed(allocate.session_id, Error(code=ErrorCode.INTERNAL, message="internal error"))
            raise
        return self.sessions.allocated(allocate.session_id, cache, self.clock())

    def _end(self, sender: _Sender) -> None:
        """EndStream: wake the stream's reader if it waits for a message (it returns, closing the stream)."""
        waiting = self._receiving.pop(sender, None)
        if waiting is not None:
            waiting.reschedule(asyncio.get_running_loop().time())

    def _arm_timer(self) -> None:
        """Keep the one timer at the machine's ``get_timer()``."""
        when = self.sessions.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, when
        if when is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, when - self.clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._spawn(self._perform(self.sessions.handle_timer(self.clock())))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _push(self, hop, push: Push, codec: Codec) -> None:
        """Send ``push`` to the next node; failures are logged only (§5.7: the client's deadline covers them)."""
        try:
            peer = hop_target(hop.peer_id)  # never the hop's addrs (spec/transport.md §3.16.5)
            reply = await self.host.call(
                peer, PROTOCOL_NAME, encode_message(push, codec), timeout=self.config.push_timeout
            )
            answer = decode_message(reply, (PushAck, Error))
            if isinstance(answer, Error):
                self.host.warn("push refused", str(hop.peer_id), f"by {hop.peer_id}: {answer.message}")
        except (ProtocolError, OSError) as exc:
            self.host.warn("push failed", str(hop.peer_id), f"to {hop.peer_id}: {exc}")  # aggregated (§3.16.3)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_at = None
        self.sessions.close_all()
