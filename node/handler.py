"""The node's side of the node protocol: one handler for every stream of ``/biopetals/node/1``.

See spec/messages.md §2.1 (stream kinds), §4 (node info), §5 (sessions, push), §6
(forward/backward) and §7 (errors). The first message of a stream decides its kind:
``NodeInfoRequest``, ``Push``, ``Forward`` and ``Backward`` get one reply and the
stream ends; ``OpenSession`` starts a session stream that carries ``Step`` and
``CloseSession`` until the session ends.

Every rule broken by a peer is answered with the spec's typed ``Error`` and the node
keeps serving (§2.6). Session state and its rules live in ``node/sessions.py``, the
tensor work in ``node/backend.py``; this module moves messages and keeps time.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from biopetals.node.backend import Backend
from biopetals.node.budget import CacheBudget
from biopetals.node.sessions import Session, SessionTable
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
    Message,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
    Push,
    PushAck,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    decode_message,
    encode_message,
    error_from_exception,
)
from biopetals.protocol.tensors import Codec
from biopetals.transport.errors import EndOfStream, TransportError
from biopetals.transport.host import Host
from biopetals.transport.streams import Stream

__all__ = ["NodeService", "ServiceConfig"]

log = logging.getLogger("biopetals.node")

_FIRST = (NodeInfoRequest, OpenSession, Push, Forward, Backward)
_ON_SESSION = (Step, CloseSession)


@dataclass(frozen=True)
class ServiceConfig:
    """What the node serves and its limits."""

    model: str  # the swarm model name (models.config.ModelInfo.dht_prefix)
    version: str
    dtype: str
    quant: str
    idle_timeout: float = 60.0
    #: Most tokens (batch x tokens) in one Forward/Backward; above: LIMIT_EXCEEDED.
    max_forward_tokens: int = 8192
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
    """Serialises sends on one stream: the session loop and push tasks both answer on it."""

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
    """Serves ``/biopetals/node/1`` on a ``Host`` with a ``Backend``."""

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
        self.sessions = SessionTable(config.idle_timeout)
        self.started = clock()
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
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
        )

    # ------------------------------------------------------------------ streams

    async def handle_stream(self, peer_id: PeerId, stream: Stream) -> None:
        """Host stream handler: the first message decides the stream's kind (§2.1)."""
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
            await previous._serve_first(message, stream, sender)
            return
        await self._serve_first(message, stream, sender)

    async def _serve_first(self, message: Message, stream: Stream, sender: _Sender) -> None:
        try:
            if isinstance(message, NodeInfoRequest):
                await sender.send(self.node_info())
            elif isinstance(message, OpenSession):
                await self._serve_session(message, stream, sender)
            elif isinstance(message, Push):
                await self._serve_push(message, sender)
            elif isinstance(message, Forward):
                await sender.send(await self._forward(message), message.codec)
            elif isinstance(message, Backward):
                await sender.send(await self._backward(message), message.codec)
        except ProtocolError as exc:
            await sender.send(error_from_exception(exc, getattr(message, "step_id", None)))
        except Exception as exc:  # a bug or an OOM: answer INTERNAL, keep serving
            log.exception("request %s failed", type(message).__name__)
            await sender.send(Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}"))

    # ------------------------------------------------------------------ common checks

    def _check_request(self, model: str, start: int, end: int, adapter: str | None = None) -> None:
        if model != self.config.model:
            raise RemoteProtocolError(
                ErrorCode.MODEL_MISMATCH, f"this node serves model {self.config.model!r}, not {model!r}"
            )
        if not (self.span.start <= start and end <= self.span.end):
            raise RemoteProtocolError(
                ErrorCode.BLOCKS_NOT_SERVED,
                f"blocks [{start}, {end}) requested; this node serves [{self.span.start}, {self.span.end})",
            )
        if adapter is not None and adapter not in self.backend.adapters.names:
            held = ", ".join(self.backend.adapters.names) or "none"
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_ADAPTER, f"adapter {adapter!r} is not loaded on this node (it holds: {held})"
            )

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.shape[-1] != self.span.hidden_size:
            raise RemoteProtocolError(
                ErrorCode.HIDDEN_SIZE_MISMATCH,
                f"hidden size {hidden.shape[-1]}; this model's is {self.span.hidden_size}",
            )

    # ------------------------------------------------------------------ forward / backward (§6)

    def _check_stateless(self, request: Forward | Backward) -> None:
        self._check_request(request.model, request.start, request.end, request.adapter)
        self._check_hidden(request.hidden)
        batch, tokens = request.hidden.shape[:2]
        if batch * tokens > self.config.max_forward_tokens:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"{batch} x {tokens} tokens in one request; this node takes at most {self.config.max_forward_tokens}",
            )
        if tokens > self.span.max_length:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"{tokens} tokens > the model's {self.span.max_length} positions"
            )

    async def _forward(self, request: Forward) -> ForwardResult:
        self._check_stateless(request)
        view = self.backend.view(request.start, request.end)
        out = await self.backend.run(
            self.backend.forward, view, request.hidden, request.prompts, request.codec, request.mask, request.adapter
        )
        return ForwardResult(hidden=out)

    async def _backward(self, request: Backward) -> BackwardResult:
        self._check_stateless(request)
        view = self.backend.view(request.start, request.end)
        grad_inputs, grad_prompts = await self.backend.run(
            self.backend.backward, view, request.hidden, request.grad_outputs, request.prompts, request.codec,
            request.mask, request.adapter,
        )
        return BackwardResult(grad_inputs=grad_inputs, grad_prompts=grad_prompts)

    # ------------------------------------------------------------------ sessions (§5)

    async def _open(self, request: OpenSession, sender: _Sender) -> Session:
        session_id = request.session_id if request.session_id is not None else os.urandom(16)
        if session_id in self.sessions:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, f"a session with id {session_id.hex()} is already open on this node"
            )
        self._check_request(request.model, request.start, request.end, request.adapter)
        if request.max_length > self.span.max_length:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"max_length {request.max_length} > the model's {self.span.max_length} positions"
            )
        nbytes = self.backend.cache_bytes(request.start, request.end, request.batch_size, request.max_length)
        self.budget.reserve(session_id, nbytes)
        try:
            cache = await self.backend.run(
                self.backend.allocate, request.start, request.end, request.batch_size, request.max_length
            )
        except (MemoryError, RuntimeError) as exc:
            self.budget.release(session_id)
            raise RemoteProtocolError(ErrorCode.CACHE_BUDGET, f"could not allocate the KV cache: {exc}") from None
        except BaseException:
            self.budget.release(session_id)
            raise
        if session_id in self.sessions:  # opened meanwhile by another stream with the same id
            self.budget.release(session_id)
            raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"session id {session_id.hex()} is already open")
        session = Session(
            session_id=session_id,
            start=request.start,
            end=request.end,
            batch_size=request.batch_size,
            max_length=request.max_length,
            codec=request.codec,
            cache=cache,
            span=self.backend.view(request.start, request.end),
            last_activity=self.clock(),
            owner=sender,
            adapter=request.adapter,
        )
        self.sessions.add(session)
        self._locks[session_id] = asyncio.Lock()
        return session

    def _close(self, session: Session) -> None:
        """Free a session's cache and reservation (idempotent)."""
        self.sessions.remove(session.session_id)
        self._locks.pop(session.session_id, None)
        self.budget.release(session.session_id)
        session.cache = None  # the worker may still hold it for a step in flight; then it is freed after

    async def _serve_session(self, request: OpenSession, stream: Stream, sender: _Sender) -> None:
        session = await self._open(request, sender)
        try:
            if not await sender.send(SessionOpened(session_id=session.session_id, idle_timeout=self.config.idle_timeout)):
                return
            await self._session_loop(session, stream, sender)
        finally:
            self._close(session)

    async def _session_loop(self, session: Session, stream: Stream, sender: _Sender) -> None:
        while True:
            wait = session.idle_deadline(self.config.idle_timeout) - self.clock()
            if wait <= 0:  # only while a pushed step runs past the deadline: check again soon, not in a loop
                wait = min(1.0, self.config.idle_timeout)
            try:
                async with asyncio.timeout(wait):
                    data = await stream.receive()
            except TimeoutError:
                lock = self._locks.get(session.session_id)
                busy = lock is not None and lock.locked()
                if busy or self.clock() < session.idle_deadline(self.config.idle_timeout):
                    continue  # a push kept it alive, or a step is still running
                await sender.send(
                    Error(code=ErrorCode.TIMEOUT, message=f"session idle for {self.config.idle_timeout:g} s: closed")
                )
                return
            except (EndOfStream, TransportError, RemoteProtocolError):
                return  # the client left (or broke the framing): free the cache (§5.9)
            try:
                message = decode_message(data, _ON_SESSION)
            except RemoteProtocolError as exc:
                await sender.send(error_from_exception(exc))
                continue
            if isinstance(message, CloseSession):
                if message.session_id != session.session_id:
                    await sender.send(
                        Error(
                            code=ErrorCode.UNKNOWN_SESSION,
                            message=f"session {message.session_id.hex()} is not open on this stream",
                        )
                    )
                    continue
                self._close(session)
                await sender.send(SessionClosed(session_id=session.session_id))
                return
            session.last_activity = self.clock()
            if message.session_id != session.session_id:
                await sender.send(
                    Error(
                        code=ErrorCode.UNKNOWN_SESSION,
                        message=f"session {message.session_id.hex()} is not open on this stream",
                        step_id=message.step_id,
                    )
                )
                continue
            await self._run_step(session, message)

    async def _serve_push(self, push: Push, sender: _Sender) -> None:
        """§5.7: check, acknowledge at once, then process like a Step of that session."""
        session = self.sessions.get(push.session_id)
        session.last_activity = self.clock()
        await sender.send(PushAck(session_id=push.session_id, step_id=push.step_id))
        if session.is_duplicate(push.step_id):
            return
        task = asyncio.get_running_loop().create_task(self._run_step(session, push))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_step(self, session: Session, step: Step | Push) -> None:
        """Run a step under the session's lock; the result or Error goes to the session stream."""
        lock = self._locks.get(session.session_id)
        if lock is None:
            return
        async with lock:
            try:
                if session.closed:
                    self.sessions.get(session.session_id)  # raises UNKNOWN_SESSION
                if session.is_duplicate(step.step_id):
                    return  # processed already: its StepResult was sent (§5.7)
                hidden = step.hidden
                session.check_step(step.position, step.tokens, hidden.shape[0], hidden.shape[2], self.span.hidden_size)
                own, rest = self._split_prompts(session, step)
                out = await self.backend.run_step(
                    session.span, session.cache, hidden, own, session.codec, step.mask, session.adapter
                )
            except ProtocolError as exc:
                await session.owner.send(error_from_exception(exc, step.step_id))
                return
            except Exception as exc:
                log.exception("step failed")
                await session.owner.send(
                    Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}", step_id=step.step_id)
                )
                return
            session.last_step_id = step.step_id
            session.last_activity = self.clock()
        if step.next:
            push = Push(
                session_id=step.next[0].session_id,
                step_id=step.step_id,
                position=step.position,
                hidden=out,
                prompts=rest,
                next=step.next[1:],
                mask=step.mask,  # every span of the chain pads the same tokens (§5.3)
            )
            task = asyncio.get_running_loop().create_task(self._push(step.next[0], push, session.codec))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await asyncio.sleep(0)  # let the push go out first: the next node's compute is the critical path
        await session.owner.send(StepResult(session_id=session.session_id, step_id=step.step_id, hidden=out), session.codec)

    def _split_prompts(self, session: Session, step: Step | Push) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prompts for this span, and the rest for the hops (§5.3, §5.7)."""
        n = session.end - session.start
        if step.next and step.next[0].start != session.end:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, f"next[0] starts at block {step.next[0].start}; this session ends at {session.end}"
            )
        if step.prompts is None:
            return None, None
        covered = (step.next[-1].end - step.next[0].start) if step.next else 0
        if step.prompts.shape[0] != n + covered:
            raise RemoteProtocolError(
                ErrorCode.INVALID_TENSOR,
                f"prompts cover {step.prompts.shape[0]} blocks; the session and its hops cover {n + covered}",
            )
        rest = step.prompts[n:] if covered else None
        return step.prompts[:n], rest

    async def _push(self, hop, push: Push, codec: Codec) -> None:
        """Send ``push`` to the next node; failures are logged only (§5.7: the client's deadline covers them)."""
        try:
            peer = hop.peer_id if isinstance(hop.peer_id, PeerId) else PeerId.from_base58(hop.peer_id)
            for addr in hop.addrs:
                try:
                    self.host.add_address(peer, addr)
                    break
                except ProtocolError:
                    continue
            reply = await self.host.call(
                peer, PROTOCOL_NAME, encode_message(push, codec), timeout=self.config.push_timeout
            )
            answer = decode_message(reply, (PushAck, Error))
            if isinstance(answer, Error):
                log.warning("push to %s refused: %s", hop.peer_id, answer.message)
        except (ProtocolError, OSError) as exc:
            log.warning("push to %s failed: %s", hop.peer_id, exc)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for session in self.sessions.sessions():
            self._close(session)
