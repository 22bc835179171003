"""Inference sessions over the whole model: a chain of node sessions, with push and failover.

``ChainSession`` (async) covers blocks ``[0, N)`` with a chain of ``SpanSession``s
(one per route span). A step is sent to the first node only, with the rest of the
chain as push hops (spec/messages.md §5.7); every node returns its output to us,
and we record what each span was fed (its ``history``).

Deadlines. Every wait has one: opening (``connect_timeout``), and each span's
result of each step, with the send itself, by an adaptive deadline
(``RemoteSwarm.step_deadline``: ``step_timeout_factor`` x the time the node's
announced throughput and the RTT predict for the step's tokens, within
``[step_timeout_floor, step_timeout]``), so a stalled node (alive, not answering)
is found in seconds.

Failover (spec/messages.md §5.9). When a span's result does not come (its node
died: the stream closes at once; or it stalled: the deadline passes), the client

1. avoids that peer for a while (exponential back-off, ``PeerHealth``; a stalled
   peer at least ``stall_ban`` seconds),
2. re-reads the announcements and routes the failed span's blocks anew, possibly
   over several nodes,
3. opens sessions there and replays the failed span's recorded inputs in their
   original chunks and under their original ``step_id``s, chaining sub-spans,
   which rebuilds the KV cache exactly as it was,
4. resends the current step from that span on (push to the rest of the chain;
   nodes that already ran it drop the duplicate, §5.7).

Chain binding (spec/messages.md §5.10): each session names the node before it in the
chain as its upstream (the first names none), so only that node may push into it; after
a replacement the next session is told its new upstream (``SetUpstream``) before the
step is resent.

A result that was pushed but does not arrive in time is first asked for directly
(the node may only have missed the push), then the node is replaced; a node we
sent the step to ourselves is replaced at its first missed deadline.

``InferenceSession`` is the synchronous user object (``model.inference_session``):
one ``ChainSession`` for the whole batch. A padded batch is one session too: each
step carries the padding mask of its new tokens (spec/messages.md §8.1), recorded
with the history so that a replay rebuilds the node's mask as well.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch

from biopetals.protocol.errors import ErrorCode

from .errors import PeerFailure, SwarmError
from .routing import MissingBlocksError, RouteSpan, format_route
from .span_session import SpanSession

if TYPE_CHECKING:
    from .swarm import RemoteSwarm

__all__ = ["ChainSession", "InferenceSession"]

log = logging.getLogger("biopetals.client")


class ChainSession:
    """Blocks ``[0, N)`` for ``batch_size`` sequences of at most ``max_length`` tokens. Async API."""

    def __init__(self, swarm: "RemoteSwarm", max_length: int, batch_size: int) -> None:
        self.swarm = swarm
        self.max_length = max_length
        self.batch_size = batch_size
        self.spans: list[SpanSession] = []
        self.position = 0
        self.failovers = 0  # replacements done, over the session's life
        self.closed = False

    @property
    def route(self) -> list[tuple[str, int, int]]:
        """``(peer_id, start, end)`` of every span in the chain now."""
        return [(s.peer_id, s.start, s.end) for s in self.spans]

    # ------------------------------------------------------------------ opening

    async def _open_route(self, start: int, end: int, failures: list[PeerFailure],
                          upstream: str | None = None) -> list[SpanSession]:
        """Sessions covering ``[start, end)``; re-routes around nodes that refuse or fail. Each names the
        node before it as its upstream (spec/messages.md §5.10); the first names ``upstream``."""
        cfg = self.swarm.config
        force = False
        for _ in range(cfg.max_failovers + 1):
            try:
                route = await self.swarm.find_route(start, end, needed_cache_tokens=self.max_length * self.batch_size,
                                                    force=force)
            except MissingBlocksError as exc:
                if failures:
                    raise SwarmError(str(exc), failures) from exc
                raise
            log.info("route for blocks %d:%d: %s", start, end, format_route(route))
            before = [upstream] + [r.server.peer_id for r in route[:-1]]
            opened = await asyncio.gather(*(self._open_span(r, up) for r, up in zip(route, before)),
                                          return_exceptions=True)
            bad = [o for o in opened if isinstance(o, BaseException)]
            if not bad:
                return list(opened)  # type: ignore[arg-type]
            for o in opened:
                if isinstance(o, SpanSession):
                    await o.close()
            for o in bad:
                if not isinstance(o, PeerFailure):
                    raise o
                failures.append(o)
                self.swarm.failed(o)
            force = True
        raise SwarmError(f"could not open sessions for blocks {start}:{end} after {cfg.max_failovers + 1} routes.",
                         failures)

    async def _open_span(self, r: RouteSpan, upstream: str | None) -> SpanSession:
        cfg = self.swarm.config
        return await SpanSession.open(self.swarm.host, r.server, r.start, r.end, model=self.swarm.model_name,
                                      max_length=self.max_length, batch_size=self.batch_size, codec=cfg.codec,
                                      timeout=cfg.connect_timeout, adapter=cfg.adapter,
                                      upstream=upstream if cfg.use_push else None)

    async def open(self) -> None:
        self.spans = await self._open_route(0, self.swarm.n_blocks, [])

    async def close(self) -> None:
        self.closed = True
        spans, self.spans = self.spans, []
        await asyncio.gather(*(s.close() for s in spans), return_exceptions=True)

    # ------------------------------------------------------------------ steps

    def _deadline(self, span: SpanSession, batch: int, tokens: int) -> float:
        return self.swarm.step_deadline(span.server, span.start, span.end, batch, tokens)

    async def step(self, hidden: torch.Tensor, mask: torch.Tensor | None = None,
                   prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Run ``hidden`` ``[batch, tokens, hidden]`` (the next tokens) through all blocks.

        ``mask``: ``[batch, tokens]`` padding mask of these tokens (1 = token, 0 = padding), or None.
        ``prompts``: deep prompts ``[N, batch, P, hidden]`` for all blocks, added before block ``i``
        to this step's first ``P`` tokens (spec/messages.md §5.3); each node gets its blocks' part
        and its hops' (push), and the history keeps each span's part for a replay.
        """
        if self.closed:
            raise SwarmError("the inference session is closed")
        if not self.spans:
            await self.open()
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        if batch != self.batch_size:
            raise ValueError(f"this session holds {self.batch_size} sequence(s), the step has {batch}")
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"the session's max_length is {self.max_length}: {self.position} tokens so far plus {tokens} new do "
                "not fit; open a session with a larger max_length"
            )
        if mask is not None:
            mask = mask.detach().to(device="cpu", dtype=torch.bool)
            if bool(mask.all()):
                mask = None  # no padding: the same as no mask (§8.1)
        if prompts is not None:
            n = self.swarm.n_blocks
            if prompts.ndim != 4 or tuple(prompts.shape[:2]) != (n, batch) or prompts.shape[3] != hidden.shape[2] \
                    or not 0 < prompts.shape[2] <= tokens:
                raise ValueError(f"prompts must be [{n}, {batch}, P <= {tokens}, {hidden.shape[2]}], "
                                 f"got {list(prompts.shape)}")
            prompts = prompts.detach().to(hidden.dtype)
        position = self.position
        step_id = position + 1
        failures: list[PeerFailure] = []
        x = hidden
        i = 0
        send_from = 0  # index to (re)send the step to, with push to the rest; -1: already sent
        asked_directly: set[int] = set()  # spans that got this step from us, not by push
        while i < len(self.spans):
            span = self.spans[i]
            timeout = self._deadline(span, batch, tokens)
            try:
                try:
                    async with asyncio.timeout(timeout):  # the send too: a stalled node stops reading
                        if send_from == i:
                            push = self.swarm.config.use_push
                            hops = tuple(s.hop() for s in self.spans[i + 1:]) if push else ()
                            for s in self.spans[i:] if push else [span]:
                                s.expect(step_id)
                            asked_directly.add(i)
                            last = self.spans[-1].end if push else span.end
                            await span.send_step(step_id, position, x, hops, mask=mask,
                                                 prompts=_blocks(prompts, span.start, last))
                            send_from = -1 if push else i + 1
                        out = await asyncio.shield(span.expect(step_id))
                except TimeoutError:
                    if i not in asked_directly:
                        # maybe only the push was lost: ask this node directly once (§5.7)
                        send_from = i
                        continue
                    raise PeerFailure(span.peer_id, f"no result for step {step_id} within {timeout:.1f} s",
                                      int(ErrorCode.TIMEOUT)) from None
            except PeerFailure as failure:
                failures.append(failure)
                self.swarm.failed(failure)
                if len(failures) > self.swarm.config.max_failovers:
                    raise SwarmError(f"step at position {position} failed {len(failures)} times; giving up.",
                                     failures) from failure
                await self._replace(i, failures)
                send_from = i
                asked_directly.discard(i)
                continue
            span.record(step_id, position, x, mask, _blocks(prompts, span.start, span.end))
            span.forget(step_id)
            if out.shape != x.shape:
                raise SwarmError(f"node {span.peer_id} returned shape {list(out.shape)} for input {list(x.shape)}")
            x = out
            i += 1
        for s in self.spans:
            self.swarm.health.record_success(s.peer_id)
        self.position = position + tokens
        return x

    async def _replace(self, i: int, failures: list[PeerFailure]) -> None:
        """Replace ``spans[i]`` by new sessions over its blocks, rebuilt from its history."""
        old = self.spans[i]
        old.abandon()
        self.failovers += 1
        while True:
            new = await self._open_route(old.start, old.end, failures, self.spans[i - 1].peer_id if i else None)
            try:
                for fed in old.history:
                    x = fed.hidden
                    batch, tokens = int(x.shape[0]), int(x.shape[1])
                    for s in new:  # the recorded prompts cover old's blocks; each part takes its own
                        part = _blocks(fed.prompts, s.start - old.start, s.end - old.start)
                        x = await s.run_step(fed.step_id, fed.position, x, self._deadline(s, batch, tokens), fed.mask,
                                             part)
            except PeerFailure as failure:
                failures.append(failure)
                self.swarm.failed(failure)
                for s in new:
                    s.abandon()
                if len(failures) > self.swarm.config.max_failovers:
                    raise SwarmError(f"could not rebuild blocks {old.start}:{old.end} on another node.",
                                     failures) from failure
                continue
            break
        log.warning("replaced %s (blocks %d:%d) by %s, replayed %d step(s)", old.peer_id, old.start, old.end,
                    ", ".join(f"{s.peer_id} {s.start}:{s.end}" for s in new), len(old.history))
        self.spans[i:i + 1] = new
        if i + len(new) < len(self.spans) and self.swarm.config.use_push:
            # the next session accepts pushes from the replacement from now on (§5.10); a failure
            # here shows at its next result, like any other
            try:
                await self.spans[i + len(new)].set_upstream(new[-1].peer_id)
            except PeerFailure as failure:
                log.warning("could not rebind %s: %s", self.spans[i + len(new)].peer_id, failure)


def _blocks(prompts: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """Prompts of blocks ``[start, end)`` (rows of the first dimension), contiguous for the wire."""
    return None if prompts is None else prompts[start:end].contiguous()


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
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < tokens:
                raise ValueError(f"attention_mask must be [{batch}, tokens so far or new tokens], "
                                 f"got {list(attention_mask.shape)}")
            mask = attention_mask[:, -tokens:]
        self._ensure_open(batch)
        out = self.swarm.loop.run(self.chains[0].step(hidden.detach(), mask, prompts))
        self.position += tokens
        return out

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
