"""What the client measured of each node's speed, and the rule that moves a session off a slow node.

Sans-IO: no sockets, no asyncio, no clock; ``now`` is an argument. See spec/messages.md §5.5
and spec/announcement.md §5: an announced throughput is a claim, believed only as far as
measurement supports it (issue 20 item 4).

- ``SpeedBook``: per peer, an EWMA of the measured seconds per block of a one-token decode
  step (the span's own time: from the moment its input was available to its result, so a
  pushed span is not charged for the spans before it), with when it was last updated.
  Prefill steps are not recorded (their cost per token is not a decode step's). Estimates older
  than ``forget_after`` are dropped, so a node that was slow once gets a new chance later.
- ``believed_block_times``: the peers with at least ``min_samples`` fresh samples and their
  measured seconds per block; ``client/routing.py`` costs a node at ``max(announced, measured)``
  per block, i.e. its throughput at ``min(announced, measured-derived)``.
- ``slow_span``: after a step, the one span (if any) to move away from: a span with at least
  ``min_samples`` samples since it was opened whose measured time over its blocks exceeds
  ``move_factor`` x, and ``min_gain`` seconds more than, what the best other route over the same
  blocks would cost (that route's nodes costed by what is believed of them). The caller replaces it through the chain's
  failover-with-replay machinery (``SessionChain.move``). Hysteresis: a new span must gather
  ``min_samples`` samples before it can be judged, and the factor means a move back needs the
  new node to be ``move_factor`` x slower than the old one was measured, so routes do not flap.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .routing import MissingBlocksError, PeerHealth, RoutingParams, ServerSpan, find_route, route_cost

__all__ = ["MeasureParams", "SpanTiming", "SpeedBook", "SlowSpan", "slow_span"]


@dataclass(frozen=True)
class MeasureParams:
    """How measured step times are weighed (named limits; ``ClientConfig.measuring``)."""

    alpha: float = 0.5  # EWMA weight of the newest sample
    min_samples: int = 3  # decode steps measured before a node's estimate counts, and before a span is judged
    move_factor: float = 3.0  # move when a span costs more than this x the best alternative
    min_gain: float = 0.05  # s per step: a smaller saving is not worth a replay (and is scheduling noise)
    forget_after: float = 300.0  # s, an estimate not refreshed this long is dropped


@dataclass(frozen=True)
class SpanTiming:
    """One span's own time of one step: ``seconds`` for ``tokens`` new tokens over ``blocks`` blocks."""

    peer_id: str
    blocks: int
    tokens: int
    seconds: float


@dataclass
class _Estimate:
    block_seconds: float
    samples: int
    updated: float


@dataclass
class SpeedBook:
    """Per-peer EWMA of measured seconds per block of a decode step."""

    params: MeasureParams = field(default_factory=MeasureParams)
    _peers: dict[str, _Estimate] = field(default_factory=dict)

    def record(self, timing: SpanTiming, now: float, rtt: float = 0.0) -> None:
        """Add one measured step; only one-token decode steps count. ``rtt``: the peer's round trip,
        taken off the sample (the route's cost model adds it separately)."""
        if timing.tokens != 1 or timing.blocks < 1 or not math.isfinite(timing.seconds) or timing.seconds < 0:
            return
        sample = max(0.0, timing.seconds - max(0.0, rtt)) / timing.blocks
        old = self._fresh(timing.peer_id, now)
        if old is None:
            self._peers[timing.peer_id] = _Estimate(sample, 1, now)
        else:
            a = self.params.alpha
            self._peers[timing.peer_id] = _Estimate(a * sample + (1 - a) * old.block_seconds, old.samples + 1, now)

    def block_seconds(self, peer_id: str, now: float) -> float | None:
        """The measured seconds per block, once ``min_samples`` fresh samples back it (else None)."""
        est = self._fresh(peer_id, now)
        return est.block_seconds if est is not None and est.samples >= self.params.min_samples else None

    def samples(self, peer_id: str, now: float) -> int:
        est = self._fresh(peer_id, now)
        return 0 if est is None else est.samples

    def believed_block_times(self, now: float) -> dict[str, float]:
        """Peer -> measured seconds per block, for the peers whose estimate counts (``find_route(measured=)``)."""
        return {p: t for p in list(self._peers) if (t := self.block_seconds(p, now)) is not None}

    def _fresh(self, peer_id: str, now: float) -> _Estimate | None:
        est = self._peers.get(peer_id)
        if est is not None and now - est.updated > self.params.forget_after:
            del self._peers[peer_id]
            return None
        return est


@dataclass(frozen=True)
class SlowSpan:
    """Move span ``index`` away from its node: it measured ``seconds`` per step, ``alternative`` is the
    expected cost of the best other route over its blocks."""

    index: int
    peer_id: str
    seconds: float
    alternative: float

    @property
    def reason(self) -> str:
        return (f"measured {self.seconds:.3f} s per step over its blocks, {self.seconds / self.alternative:.1f}x the "
                f"{self.alternative:.3f} s another route is expected to take")


def slow_span(
    spans: Iterable[tuple[str, int, int, int]],
    servers: Iterable[ServerSpan],
    book: SpeedBook,
    *,
    now: float,
    rtts: Mapping[str, float] | None = None,
    health: PeerHealth | None = None,
    routing: RoutingParams = RoutingParams(),
) -> SlowSpan | None:
    """The span to move away from, or None. ``spans``: ``(peer_id, start, end, samples since the span
    opened)`` in chain order. The worst offender (largest ratio) is chosen; one move per call."""
    servers = list(servers)
    rtts = rtts or {}
    params = book.params
    measured = book.believed_block_times(now)
    worst: SlowSpan | None = None
    for i, (peer, start, end, fresh) in enumerate(spans):
        per_block = measured.get(peer)
        if fresh < params.min_samples or per_block is None:
            continue
        seconds = per_block * (end - start) + rtts.get(peer, routing.default_rtt)
        others = [s for s in servers if s.peer_id != peer]
        try:
            route = find_route(others, start, end, now=now, rng=random.Random(0), rtts=rtts, health=health,
                               params=replace(routing, tie_jitter=0.0), measured=measured)
        except MissingBlocksError:
            continue  # nobody else serves these blocks: a slow node beats none
        alternative = route_cost(route, rtts, routing, measured=measured)
        if seconds > params.move_factor * alternative and seconds - alternative > params.min_gain and (
                worst is None or seconds / alternative > worst.seconds / worst.alternative):
            worst = SlowSpan(i, peer, seconds, alternative)
    return worst
