"""Inference sessions over the whole model: the asyncio driver of the chain state, and the user's object.

``ChainSession`` (async) drives one ``SessionChain`` (client/chain.py, sans-IO), which
owns every rule: the route's spans, the position, the history, push (spec/messages.md
§5.7), deadlines, failover and replay (§5.9). The driver only does what the state's
action says (route and open sessions, send a step, wait for the nodes' messages until
the state's timer, abandon sessions, avoid a peer) and reports what happened, with
``time.monotonic()`` as ``now``. Every span's reader (client/span_session.py) puts
its events on one queue that the driver feeds to the state while it waits.

Keepalive (spec/messages.md §5.9.1): while the driver waits for a step's results it also wakes at
the ``KeepAlives`` timer (client/keepalive.py) and sends ``KeepAlive`` to the sessions due, so that
nodes waiting for a ``Push``, or for the nodes after them, do not close their sessions as idle
during a long step; it never does between steps (an idle user's sessions expire and are replayed
later).

Chain binding (spec/messages.md §5.10): the state's ``OpenSpans`` says which node each new
session names as its upstream (the node before it), and ``Rebind`` makes the driver tell a
session its new upstream (``SetUpstream``) after the node before it was replaced.

Deadlines: each span's result of each step is due within ``RemoteSwarm.step_deadline``
(``step_timeout_factor`` x the time the node's announced throughput and the RTT
predict, within ``[step_timeout_floor, step_timeout]``), so a stalled node (alive, not
answering) is found in seconds; opening has ``connect_timeout``.

Measured speed (client/measurements.py; spec/announcement.md §5): after each step the driver
records every span's own time in the swarm's ``SpeedBook`` (routes then cost a node at the slower
of its announcement and its measurement) and, if ``slow_span`` names a span measured much slower
than another route, moves it (``SessionChain.move``: make before break, with replay).

``InferenceSession`` is the synchronous user object (``model.inference_session``):
one ``ChainSession`` for the whole batch; a prompt longer than one message may carry
goes as several steps (client/chunking.py). A padded batch is one session too: each
step carries the padding mask of its new tokens (spec/messages.md §8.1), recorded
with the history so that a replay rebuilds the node's mask as well.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

from biopetals.protocol.messages import StepResult

from .chain import Abandon, Avoid, ChainSpan, Finished, OpenSpans, Rebind, SendStep, SessionChain, WaitResult
from .errors import PeerFailure, SwarmError
from .keepalive import KeepAlives
from .measurements import slow_span
from .routing import MissingBlocksError, RouteSpan, format_route
from .span_session import SpanSession
from .verification import rebuilt_records
from .verifying import check_step

if TYPE_CHECKING:
    from .swarm import RemoteSwarm

__all__ = ["ChainSession", "InferenceSession"]

log = logging.getLogger("biopetals.client")

MAX_REBUILDS = 3  # chains rebuilt around liars within one step before its output is returned unverified


class ChainSession:
    """Blocks ``[0, N)`` for ``batch_size`` sequences of at most ``max_length`` tokens. Async API."""

    def __init__(self, swarm: "RemoteSwarm", max_length: int, batch_size: int) -> None:
        cfg = swarm.config
        self.swarm = swarm
        self.max_length = max_length
        self.batch_size = batch_size
        self.state = SessionChain(swarm.n_blocks, max_length, batch_size, deadline=swarm.step_deadline,
                                  max_failovers=cfg.max_failovers, use_push=cfg.use_push, chunking=cfg.chunking(),
                                  hidden_size=swarm.hidden_size, max_positions=swarm.max_positions)
        self._events: asyncio.Queue[tuple[SpanSession, StepResult | PeerFailure]] = asyncio.Queue()
        self._spans: dict[SpanSession, ChainSpan] = {}
        self.keepalives = KeepAlives()  # the sessions that take KeepAlive, and when each is due (§5.9.1)
        self.keepalives_sent = 0  # over the session's life

    @property
    def spans(self) -> list[ChainSpan]:
        return self.state.spans

    @property
    def position(self) -> int:
        return self.state.position

    @property
    def failovers(self) -> int:
        return self.state.failovers

    @property
    def moves(self) -> int:
        return self.state.moves

    @property
    def closed(self) -> bool:
        return self.state.closed

    @property
    def route(self) -> list[tuple[str, int, int]]:
        """``(peer_id, start, end)`` of every span in the chain now."""
        return [(s.peer_id, s.start, s.end) for s in self.state.spans]

    async def open(self) -> None:
        self.state.open(time.monotonic())
        await self._drive()

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``hidden`` ``[batch, tokens, hidden]`` (the next tokens) through all blocks; see
        ``SessionChain.step`` for ``mask`` and ``prompts``."""
        self.state.step(hidden, mask, prompts, time.monotonic())
        out = await self._drive()
        if self.swarm.verifier.enabled:
            out = await self._verified(out)
        for s in self.state.spans:
            self.swarm.health.record_success(s.peer_id)
        await self._reconsider()
        return out

    async def _verified(self, out: torch.Tensor) -> torch.Tensor:
        """Check the step's sampled spans on replicas (client/verifying.py); if a node there lied, rebuild
        the chain from its span on (``SessionChain.rebuild``, liars are never routed again), check the
        rebuilt spans' outputs in turn, and return the rebuilt outputs of the step instead."""
        records, first = self.state.records, self.state.position - int(out.shape[1])
        for _ in range(MAX_REBUILDS):
            liars = await check_step(self.swarm, records)
            index = next((i for i, s in enumerate(self.state.spans) if s.peer_id in liars), None)
            if index is None:
                return out
            self.state.rebuild(index, time.monotonic())
            replayed = await self._drive()
            out = torch.cat([o for fed, o in replayed if fed.position >= first], dim=1)
            records = rebuilt_records(self.state.spans, index, first, replayed)
        log.warning("verification: still finding liars after %d rebuilds; this step's output is unverified",
                    MAX_REBUILDS)
        return out

    async def _reconsider(self) -> None:
        """Record the step's measured span times and move off a span measured much slower than another
        route would be (client/measurements.py; spec/messages.md §5.5)."""
        swarm, now = self.swarm, time.monotonic()
        rtts = swarm.rtts()
        for timing in self.state.timings:
            swarm.speeds.record(timing, now, rtts.get(timing.peer_id, 0.0))
        spans = [(s.peer_id, s.start, s.end, s.decode_steps) for s in self.state.spans]
        slow = slow_span(spans, swarm.servers, swarm.speeds, now=now, rtts=rtts, health=swarm.health,
                         routing=swarm.config.routing)
        if slow is None:
            return
        log.info("moving blocks %d:%d off %s: %s", self.state.spans[slow.index].start,
                 self.state.spans[slow.index].end, slow.peer_id, slow.reason)
        self.state.move(slow.index, slow.reason, now)
        if not await self._drive():
            log.info("no other route opened; staying on %s", slow.peer_id)

    async def close(self) -> None:
        spans = self.state.close()
        for s in spans:
            self.keepalives.remove(s.handle)
        await asyncio.gather(*(s.handle.close() for s in spans if s.handle is not None), return_exceptions=True)

    # ------------------------------------------------------------------ the driver

    async def _drive(self):
        """Do what the state says until its operation finishes; returns its value."""
        state = self.state
        try:
            while True:
                action = state.action
                if isinstance(action, Finished):
                    return action.value
                if isinstance(action, WaitResult):
                    await self._wait(action.deadline)
                elif isinstance(action, SendStep):
                    await self._send(action)
                elif isinstance(action, OpenSpans):
                    await self._open(action)
                elif isinstance(action, Abandon):
                    for s in action.spans:
                        self._spans.pop(s.handle, None)
                        self.keepalives.remove(s.handle)
                    await asyncio.gather(*(s.handle.close() if action.close else _abandon(s.handle)
                                           for s in action.spans))
                    state.done(time.monotonic())
                elif isinstance(action, Avoid):
                    self.swarm.failed(action.failure)
                    state.done(time.monotonic())
                elif isinstance(action, Rebind):
                    try:
                        await action.span.handle.set_upstream(action.upstream)
                    except PeerFailure as failure:
                        state.span_failed(action.span, failure, time.monotonic())
                    state.done(time.monotonic())
                else:
                    raise RuntimeError(f"unexpected action {action!r}")
        except BaseException:
            if state.busy:  # cancelled or failed mid-operation: the session is not usable any more
                await self.close()
            raise

    async def _open(self, action: OpenSpans) -> None:
        try:
            route = await self.swarm.find_route(action.start, action.end, force=action.force,
                                                needed_cache_tokens=self.max_length * self.batch_size)
        except MissingBlocksError as exc:
            self.state.no_route(exc, time.monotonic())
            return
        log.info("route for blocks %d:%d: %s", action.start, action.end, format_route(route))
        upstreams = action.upstreams([r.peer_id for r in route])
        opened = await asyncio.gather(*(self._open_span(r, up) for r, up in zip(route, upstreams)),
                                      return_exceptions=True)
        for o in opened:
            if isinstance(o, BaseException) and not isinstance(o, PeerFailure):
                await asyncio.gather(*(s.close() for s in opened if isinstance(s, SpanSession)))
                raise o
        spans = [ChainSpan(o.server, o.start, o.end, handle=o, rollback=o.rollback) for o in opened
                 if isinstance(o, SpanSession)]
        self._spans.update((s.handle, s) for s in spans)
        now = time.monotonic()
        for s in spans:  # never to a node that did not advertise it (§5.9.1)
            self.keepalives.add(s.handle, s.handle.idle_timeout, now, advertised=s.handle.keepalive)
        self.state.opened(spans, [o for o in opened if isinstance(o, PeerFailure)], time.monotonic())

    async def _open_span(self, r: RouteSpan, upstream: str | None) -> SpanSession:
        cfg = self.swarm.config
        return await SpanSession.open(self.swarm.host, r.server, r.start, r.end, model=self.swarm.model_name,
                                      max_length=self.max_length, batch_size=self.batch_size, codec=cfg.codec,
                                      timeout=cfg.connect_timeout, adapter=cfg.adapter, upstream=upstream,
                                      on_event=lambda session, event: self._events.put_nowait((session, event)))

    async def _send(self, a: SendStep) -> None:
        try:
            async with asyncio.timeout(a.deadline - time.monotonic()):  # a stalled node stops reading
                await a.span.handle.send_step(a.step_id, a.position, a.hidden, tuple(h.handle.hop() for h in a.hops),
                                              mask=a.mask, prompts=a.prompts, truncate=a.truncate)
        except TimeoutError:
            self.state.handle_timer(max(time.monotonic(), a.deadline))
        except PeerFailure as failure:
            self.state.span_failed(a.span, failure, time.monotonic())
        else:
            self.keepalives.heard(a.span.handle, time.monotonic())
            self.state.done(time.monotonic())

    async def _wait(self, deadline: float) -> None:
        """Feed the state the next event from the nodes, or the timer; meanwhile keep the chain's
        sessions alive (§5.9.1): this runs only while a step's results are awaited."""
        keepalive_at = self.keepalives.get_timer()
        wake = deadline if keepalive_at is None else min(deadline, keepalive_at)
        try:
            async with asyncio.timeout(wake - time.monotonic()):
                session, event = await self._events.get()
        except TimeoutError:
            if wake < deadline:
                await self._keep_alive()
            else:
                self.state.handle_timer(max(time.monotonic(), deadline))
            return
        span = self._spans.get(session)
        if span is None:
            return
        if isinstance(event, PeerFailure):
            self._spans.pop(session, None)
            self.keepalives.remove(session)
            self.state.span_failed(span, event, time.monotonic())
        else:
            self.keepalives.heard(session, time.monotonic())
            self.state.result(span, event.step_id, event.hidden, time.monotonic())

    async def _keep_alive(self) -> None:
        """Send ``KeepAlive`` to every session due (client/keepalive.py); a failed send is that span's failure."""
        due = self.keepalives.due(time.monotonic())
        sent = await asyncio.gather(*(session.keep_alive() for session in due), return_exceptions=True)
        for session, outcome in zip(due, sent):
            if outcome is None:
                self.keepalives_sent += 1
                continue
            self.keepalives.remove(session)
            span = self._spans.get(session)
            if isinstance(outcome, PeerFailure) and span is not None:
                self.state.span_failed(span, outcome, time.monotonic())
            elif not isinstance(outcome, PeerFailure):
                raise outcome


async def _abandon(session: SpanSession) -> None:
    session.abandon()


class InferenceSession:
    """A synchronous inference session over the whole model (``with model.inference_session(...)``).

    ``step(hidden, attention_mask=None)`` runs the next tokens' hidden states
    ``[batch, tokens, hidden]`` through every remote block and returns the outputs.
    ``attention_mask`` (1 = token, 0 = padding), as transformers passes it (over all
    tokens so far, or the new ones only): its new columns travel with the step
    (spec/messages.md §8.1), and the nodes derive positions from it (§5.6).
    """

    def __init__(self, swarm: "RemoteSwarm", max_length: int, batch_size: int | None = None) -> None:
        self.swarm = swarm
        self.max_length = max_length
        self.batch_size = batch_size
        self.chains: list[ChainSession] = []
        self.position = 0  # columns stepped so far (padding included)
        self.rollbacks = 0  # crops that cut columns (speculative decoding's rejected candidates, §5.6.1)
        self.columns_cut = 0  # columns those crops cut in all
        self.closed = False

    # context manager
    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def route(self) -> list[list[tuple[str, int, int]]]:
        """Per chain: ``(peer_id, start, end)`` of each span (one chain: the whole batch)."""
        return [c.route for c in self.chains]

    @property
    def failovers(self) -> int:
        return sum(c.failovers for c in self.chains)

    @property
    def moves(self) -> int:
        """Spans moved off a node measured too slow (client/measurements.py)."""
        return sum(c.moves for c in self.chains)

    @property
    def keepalives_sent(self) -> int:
        """``KeepAlive`` messages sent while steps were under way (spec/messages.md §5.9.1)."""
        return sum(c.keepalives_sent for c in self.chains)

    def _ensure_open(self, batch: int) -> None:
        if self.chains:
            return
        if self.batch_size is not None and self.batch_size != batch:
            raise ValueError(f"session opened for batch_size={self.batch_size}, step has {batch} sequences")
        self.batch_size = batch
        self.chains = [ChainSession(self.swarm, self.max_length, batch)]
        try:
            self.swarm.loop.run(self.chains[0].open())
        except BaseException:
            self.close()
            raise

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             prompts: torch.Tensor | None = None) -> torch.Tensor:
        if self.closed:
            raise SwarmError("the inference session is closed")
        if hidden.ndim != 3:  # the state checks the rest; this much is needed to read the mask
            raise ValueError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2:  # the state checks the new columns' shape (client/chain.py)
                raise ValueError(f"attention_mask must be [{batch}, tokens so far or new tokens], "
                                 f"got {list(attention_mask.shape)}")
            mask = attention_mask[:, -tokens:]
        self._ensure_open(batch)
        out = self.swarm.loop.run(self.chains[0].step(hidden.detach(), mask, prompts))
        self.position += tokens
        return out

    def check_rollback(self) -> None:
        """``RequestError`` when a node of the route does not accept rollback (spec/messages.md §5.6.1)."""
        for chain in self.chains:
            chain.state.check_rollback()

    def crop(self, position: int) -> None:
        """Roll the session back to ``position`` columns (speculative decoding, spec/messages.md §5.6.1):
        the next step starts there and every node cuts its cache first. Raises ``RequestError`` when a
        node of the route does not accept rollback."""
        if self.closed:
            raise SwarmError("the inference session is closed")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} columns")
        for chain in self.chains:
            chain.state.crop(position)
        if position < self.position:
            self.rollbacks += 1
            self.columns_cut += self.position - position
        self.position = position

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.chains and self.swarm.loop.running:
            try:
                chains = self.chains

                async def close_all() -> None:
                    await asyncio.gather(*(c.close() for c in chains), return_exceptions=True)

                self.swarm.loop.run(close_all(), timeout=15)
            except Exception as exc:
                log.debug("closing the session: %s", exc)
