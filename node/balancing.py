"""Which blocks a node serves: the choice at start and the decision to move (Petals' rule).

Sans-IO: announcements in, a span out. No asyncio, no clock, no sockets; randomness
(``rng``) comes from the caller. See spec/announcement.md §5 (what a node announces so
that others can balance against it) and node/placement.py (the I/O around it).

The model. Every node that is ``joining`` or ``online`` adds its announced
``inference_tps`` (tokens/s through its whole span, so through each of its blocks) to
every block of its span; a block's sum is its *throughput*, and the swarm's
*bottleneck* is the smallest block throughput: no chain of nodes can carry more tokens/s
than its slowest block's servers together. A node whose throughput is unknown (it
announces 0, e.g. ``--no-benchmark``) counts as the mean of the known ones (1.0 when
none is known), so that it is neither ignored nor piled upon.

* ``choose_best_span``: the ``num_blocks`` contiguous blocks whose service most raises
  the bottleneck (the node's own throughput added to the window); among equal gains,
  Petals' rule (the window whose sorted throughputs are smallest, i.e. the least served);
  among still-equal windows, those that start at the left edge of an under-served run or
  end at the right edge of one (so a gap is filled from its side, not cut in the middle),
  picked at random with ``rng``. An empty swarm: blocks from 0.
* ``should_move``: Petals' ``should_choose_other_blocks``: take the node out, put it at
  its best place, let every other node do the same (random order) until nobody moves;
  move only when the bottleneck that could be reached beats today's by more than the
  ``balance_quality`` ratio (today / reachable < balance_quality).
* ``resolve_join``: concurrent joiners. After announcing ``joining``, a node looks again
  and counts only the online nodes and the joining nodes whose peer id sorts before its
  own; if a strictly better span exists for it in that view, it moves there. The first
  joiner (in peer-id order) never moves, the second moves out of its way, and so on:
  joiners that read the same empty swarm spread instead of all serving blocks 0:N.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from biopetals.protocol.announcement import Announcement, State

__all__ = [
    "BalancingError",
    "ServedSpan",
    "spans_from_announcements",
    "block_throughputs",
    "bottleneck",
    "choose_best_span",
    "span_score",
    "should_move",
    "resolve_join",
    "DEFAULT_BALANCE_QUALITY",
]

#: Move when today's bottleneck is below this fraction of the reachable one (Petals: 0.75).
DEFAULT_BALANCE_QUALITY = 0.75
#: Relative tolerance under which two throughputs are equal (sums in different orders).
_REL_EPS = 1e-9
#: Petals' eps: a node taken out subtracts (1 + eps) x its throughput, so that it does not
#: see its own blocks as slightly less served than they are and move for nothing.
_OUT_EPS = 1e-3


class BalancingError(ValueError):
    """A request the choice cannot answer (bad sizes or throughputs): the caller's mistake."""


@dataclass(frozen=True)
class ServedSpan:
    """One node's blocks ``[start, end)`` and its throughput through each of them (tokens/s)."""

    peer_id: str
    start: int
    end: int
    throughput: float
    state: State = State.ONLINE

    @property
    def length(self) -> int:
        return self.end - self.start


def spans_from_announcements(announcements: Mapping[str, Announcement], n_blocks: int) -> list[ServedSpan]:
    """The spans to balance against: ``joining`` and ``online`` nodes, clipped to the model.

    ``offline`` nodes are left out. An announced throughput of 0 (unknown) becomes the
    mean of the known ones (1.0 when none is known). Sorted by peer id, so that sums are
    always made in the same order.
    """
    live = [(peer, ann) for peer, ann in sorted(announcements.items())
            if ann.state != State.OFFLINE and ann.start < n_blocks]
    known = [ann.inference_tps for _, ann in live if ann.inference_tps > 0]
    default = sum(known) / len(known) if known else 1.0
    return [
        ServedSpan(peer, ann.start, min(ann.end, n_blocks), ann.inference_tps if ann.inference_tps > 0 else default,
                   ann.state)
        for peer, ann in live
    ]


def block_throughputs(spans: Iterable[ServedSpan], n_blocks: int, *, exclude: str | None = None) -> list[float]:
    """Per block: the sum of the throughputs of the spans that serve it (``exclude``: a peer left out)."""
    out = [0.0] * n_blocks
    for span in spans:
        if span.peer_id == exclude:
            continue
        for block in range(max(0, span.start), min(span.end, n_blocks)):
            out[block] += span.throughput
    return out


def bottleneck(throughputs: Sequence[float]) -> float:
    """The smallest block throughput: what the swarm can carry end to end (0 if a block is unserved)."""
    return min(throughputs) if throughputs else 0.0


def _check(n_blocks: int, num_blocks: int, own_throughput: float) -> None:
    if n_blocks < 1:
        raise BalancingError(f"the model has {n_blocks} blocks; need at least 1")
    if not 1 <= num_blocks <= n_blocks:
        raise BalancingError(f"cannot serve {num_blocks} blocks of a {n_blocks}-block model (need 1..{n_blocks})")
    if not own_throughput > 0 or own_throughput == float("inf"):
        raise BalancingError(f"own throughput must be finite and > 0, not {own_throughput}")


def _quantum(throughputs: Sequence[float], own_throughput: float) -> float:
    return max(max(throughputs, default=0.0), own_throughput) * _REL_EPS


def span_score(throughputs: Sequence[float], start: int, num_blocks: int, own_throughput: float,
               quantum: float | None = None) -> tuple:
    """A sortable score of serving ``[start, start + num_blocks)``; greater is better.

    (the bottleneck with the node's throughput added there, then Petals' rule: the
    window's sorted throughputs, smaller first), both rounded to ``quantum``.
    """
    q = quantum if quantum is not None else _quantum(throughputs, own_throughput)
    end = start + num_blocks
    window = throughputs[start:end]
    after = min(min(window) + own_throughput, min(throughputs[:start], default=float("inf")),
                min(throughputs[end:], default=float("inf")))
    return (round(after / q), tuple(-round(t / q) for t in sorted(window)))


def _aligned(throughputs: Sequence[float], start: int, end: int) -> bool:
    """The window starts where an under-served run starts, or ends where one ends (not at the model's end)."""
    n = len(throughputs)
    left = start == 0 or throughputs[start - 1] > throughputs[start]
    right = end < n and throughputs[end] > throughputs[end - 1]
    return left or right


def choose_best_span(spans: Iterable[ServedSpan], n_blocks: int, num_blocks: int, own_throughput: float,
                     rng: random.Random, *, exclude: str | None = None) -> tuple[int, int]:
    """The span ``(start, end)`` of ``num_blocks`` blocks a node should serve (see the module doc).

    ``spans``: the others' (``exclude`` drops one peer, e.g. the caller itself).
    ``own_throughput``: the node's tokens/s through ``num_blocks`` blocks.
    """
    _check(n_blocks, num_blocks, own_throughput)
    throughputs = block_throughputs(spans, n_blocks, exclude=exclude)
    return _best_start(throughputs, num_blocks, own_throughput, rng)


def _best_starts(throughputs: Sequence[float], num_blocks: int, own_throughput: float) -> tuple[tuple, list[int]]:
    """The best ``span_score`` and every start that has it (one pass, then the tie-break on the few left)."""
    n = len(throughputs)
    q = _quantum(throughputs, own_throughput)
    inf = float("inf")
    prefix, suffix = [inf] * (n + 1), [inf] * (n + 1)  # prefix[i] = min(t[:i]), suffix[i] = min(t[i:])
    for i, t in enumerate(throughputs):
        prefix[i + 1] = min(prefix[i], t)
    for i in range(n - 1, -1, -1):
        suffix[i] = min(suffix[i + 1], throughputs[i])
    afters = []
    for s in range(n - num_blocks + 1):
        window_min = min(throughputs[s : s + num_blocks])
        afters.append(round(min(window_min + own_throughput, prefix[s], suffix[s + num_blocks]) / q))
    top = max(afters)
    candidates = [s for s, a in enumerate(afters) if a == top]
    scored = [(span_score(throughputs, s, num_blocks, own_throughput, q), s) for s in candidates]
    best = max(score for score, _ in scored)
    return best, [s for score, s in scored if score == best]


def _best_start(throughputs: list[float], num_blocks: int, own_throughput: float,
                rng: random.Random) -> tuple[int, int]:
    _, ties = _best_starts(throughputs, num_blocks, own_throughput)
    aligned = [s for s in ties if _aligned(throughputs, s, s + num_blocks)]
    start = rng.choice(aligned or ties)
    return start, start + num_blocks


def resolve_join(spans: Iterable[ServedSpan], me: str, current: tuple[int, int], n_blocks: int,
                 own_throughput: float, rng: random.Random) -> tuple[int, int] | None:
    """After announcing ``joining`` on ``current``: a better span to take instead, or None to keep it.

    Counts the online nodes and the joining nodes whose peer id sorts before ``me``
    (module doc); ``current`` is kept unless another span scores strictly better.
    """
    start, end = current
    num_blocks = end - start
    _check(n_blocks, num_blocks, own_throughput)
    if not 0 <= start < end <= n_blocks:
        raise BalancingError(f"span {start}:{end} is not inside the model's 0:{n_blocks}")
    before = [s for s in spans if s.peer_id != me and (s.state == State.ONLINE or s.peer_id < me)]
    throughputs = block_throughputs(before, n_blocks)
    q = _quantum(throughputs, own_throughput)
    if span_score(throughputs, start, num_blocks, own_throughput, q) >= _best_starts(
            throughputs, num_blocks, own_throughput)[0]:
        return None
    return _best_start(throughputs, num_blocks, own_throughput, rng)


def should_move(spans: Iterable[ServedSpan], me: str, n_blocks: int, rng: random.Random,
                balance_quality: float = DEFAULT_BALANCE_QUALITY) -> tuple[int, int] | None:
    """Petals' rebalancing test: the span ``me`` should move to, or None to stay.

    ``spans`` must include ``me``'s own. Moves only when today's bottleneck is below
    ``balance_quality`` x the bottleneck reachable if every node took its best place
    (``balance_quality`` > 1 always moves to the best place, for debugging).
    """
    if not 0 < balance_quality:
        raise BalancingError(f"balance_quality must be > 0, not {balance_quality}")
    spans = {s.peer_id: s for s in spans}
    if me not in spans:
        raise BalancingError(f"{me} is not among the spans: announce before balancing")
    mine = spans[me]
    throughputs = block_throughputs(spans.values(), n_blocks)
    initial = bottleneck(throughputs)
    best = _best_after_removal(throughputs, mine, rng)
    if best == (mine.start, mine.end):
        return None
    if balance_quality > 1.0:
        return best
    # Simulate the move, then let every node (random order) take its best place until none moves.
    moved = {peer: replace(s) for peer, s in spans.items()}
    _move(throughputs, moved, me, best)
    changed = True
    rounds = 0
    while changed and rounds < 4 * len(moved) + 4:
        changed, rounds = False, rounds + 1
        order = sorted(moved)
        rng.shuffle(order)
        for peer in order:
            span = moved[peer]
            place = _best_after_removal(throughputs, span, rng)
            if place != (span.start, span.end):
                _move(throughputs, moved, peer, place)
                changed = True
    reachable = bottleneck(throughputs)
    if reachable <= initial or reachable < _OUT_EPS:
        return None
    return best if initial / reachable < balance_quality - 1e-4 else None


def _best_after_removal(throughputs: list[float], span: ServedSpan, rng: random.Random) -> tuple[int, int]:
    """Where ``span``'s node would go if it left now (it keeps its place when that is among the best)."""
    out = [t - span.throughput * (1 + _OUT_EPS) if span.start <= b < span.end else t
           for b, t in enumerate(throughputs)]
    q = _quantum(out, span.throughput)
    if span_score(out, span.start, span.length, span.throughput, q) >= _best_starts(
            out, span.length, span.throughput)[0]:
        return span.start, span.end
    return _best_start(out, span.length, span.throughput, rng)


def _move(throughputs: list[float], spans: dict[str, ServedSpan], peer: str, place: tuple[int, int]) -> None:
    span = spans[peer]
    for b in range(span.start, span.end):
        throughputs[b] -= span.throughput
    spans[peer] = replace(span, start=place[0], end=place[1])
    for b in range(place[0], place[1]):
        throughputs[b] += span.throughput
