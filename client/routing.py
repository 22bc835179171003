"""Route finding: which nodes serve which blocks, as a chain of least expected latency.

Sans-IO: no sockets, no asyncio, no clock. Candidates come from the DHT
announcements (``ServerSpan``), round-trip times from the transport's keepalive,
time (``now``) and randomness (``rng``) from the caller.

The cost model (per decode step of one token, in seconds). A chain of spans
``(server_1, [b0, b1)), (server_2, [b1, b2)), ...`` costs

    sum_k  rtt(server_k) + (b_{k+1} - b_k) * block_time(server_k)

where ``block_time`` is ``1 / (inference_tps * blocks served)`` (the announced
throughput covers the node's whole span) and ``rtt`` the measured round trip
(``default_rtt`` for a peer never measured). Where the client measured a node's decode steps
(``measured``, client/measurements.py) the slower of announced and measured ``block_time`` counts:
an announcement is believed only as far as measurement supports it (spec/announcement.md §5).
With server-to-server push a step really costs one hop per span plus the return of the last one, so ``rtt`` per span
is the right order of magnitude. The cheapest chain is a shortest path over block
boundaries (Dijkstra on a DAG, boundaries = every announced start and end).

Load spreading: a node's ``block_time`` grows with its open sessions
(``(1 + load_weight x sessions) / (inference_tps x blocks)``, sessions read live from
``NodeInfo`` by the caller), so concurrent clients fill replicas in proportion to their
announced throughput instead of all taking the fastest; and each candidate's cost is
multiplied by ``1 + U(0, tie_jitter)`` drawn once per ``find_route`` call, so servers
within a few percent of each other are picked at random while a clearly faster idle
one always wins. Servers whose
``cache_tokens_left`` cannot hold the session (``needed_cache_tokens``) and peers
in back-off (``PeerHealth``) are not candidates.

A block nobody usable serves makes ``MissingBlocksError``, which names the missing
block ranges, the nodes found, and the nodes left out (and why).

Deadlines (``step_deadline``): how long to wait for one span's result of one
inference step before calling its node stalled. The same cost model gives the
expected time, scaled by a slack factor and kept within ``[floor, ceiling]``, so a
stalled node is replaced after seconds, not after a fixed minute, while a long
prefill on a slow node still gets the time it needs. The ceiling is per
``ceiling_tokens`` of the step's work (``batch x tokens``): a node announcing an
absurdly low throughput cannot make a decode step wait past the ceiling, yet a
4096-token prefill on slow CPU nodes (minutes on an 8B-shaped span, issue 22) is
not cut off at one ceiling's worth of time.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = [
    "ServerSpan",
    "RouteSpan",
    "RoutingParams",
    "MissingBlocksError",
    "PeerHealth",
    "find_route",
    "route_cost",
    "missing_ranges",
    "format_route",
    "DeadlineParams",
    "expected_step_time",
    "step_deadline",
]


@dataclass(frozen=True)
class ServerSpan:
    """One node's offer, from its announcement: blocks ``[start, end)`` and how fast."""

    peer_id: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()
    inference_tps: float = 0.0  # decode tokens/s over the whole span; 0 = unknown
    forward_tps: float = 0.0  # batched forward tokens/s; 0 = unknown
    cache_tokens_left: int = 1 << 62
    online: bool = True
    adapters: tuple[str, ...] = ()  # server-side adapters it holds (spec/messages.md §6.3)
    sessions: int = 0  # inference sessions open on the node now (NodeInfo, not announced); 0 = unknown or none
    dtype: str = "float32"  # compute dtype it announces (client/verification.py tolerances)
    quant: str = "none"  # weight quantisation it announces (a replica must match it to verify it)

    @property
    def n_blocks(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class RouteSpan:
    """Blocks ``[start, end)`` of the chain, served by ``server``."""

    server: ServerSpan
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.server.peer_id


@dataclass(frozen=True)
class RoutingParams:
    default_rtt: float = 0.005  # s, for a peer we never measured
    default_tps: float = 10.0  # tokens/s over a span, when a node announces 0
    tie_jitter: float = 0.03  # relative: costs closer than this are ties
    min_rtt: float = 1e-4
    # s added per block served by a recently failed peer that is the only one left for
    # some blocks: large enough that it serves only what no healthy peer can.
    last_resort_penalty: float = 1000.0
    # load: a node with k open sessions computes a step in (1 + load_weight x k) times its
    # announced time (its worker serves the sessions' steps in turn)
    load_weight: float = 1.0


class MissingBlocksError(LookupError):
    """Some blocks of ``[0, n_blocks)`` are served by no usable node."""

    def __init__(
        self,
        missing: list[tuple[int, int]],
        found: list[ServerSpan],
        excluded: Mapping[str, str] | None = None,
        model: str = "",
    ) -> None:
        self.missing = missing
        self.found = found
        self.excluded = dict(excluded or {})
        what = ", ".join(f"{a}:{b}" for a, b in missing)  # one notation: half-open START:END
        nodes = "; ".join(f"{s.peer_id} serves {s.start}:{s.end}" for s in found) or "no nodes at all"
        text = f"no usable node serves block(s) {what}{' of ' + model if model else ''}. Nodes found: {nodes}."
        if self.excluded:
            text += " Left out: " + "; ".join(f"{p} ({why})" for p, why in self.excluded.items()) + "."
        text += " Start a node for the missing blocks (biopetals-node --blocks A:B), or wait for one to come back."
        super().__init__(text)


@dataclass
class PeerHealth:
    """Which peers failed recently; a failing peer is avoided with exponential back-off.

    The first failure bans a peer for ``base`` seconds, each further consecutive
    failure doubles it (up to ``cap``); a success clears the record. Time is an argument.
    """

    base: float = 2.0
    cap: float = 300.0
    _failures: dict[str, int] = field(default_factory=dict)
    _banned_until: dict[str, float] = field(default_factory=dict)

    def record_failure(self, peer_id: str, now: float, at_least: float = 0.0) -> float:
        """Ban ``peer_id``; returns until when. ``at_least``: the shortest ban for this failure
        (a node that stalled usually stays stalled longer than ``base``)."""
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        until = now + min(self.cap, max(at_least, self.base * 2 ** (count - 1)))
        self._banned_until[peer_id] = until
        return until

    def record_success(self, peer_id: str) -> None:
        self._failures.pop(peer_id, None)
        self._banned_until.pop(peer_id, None)

    def banned_until(self, peer_id: str, now: float) -> float | None:
        until = self._banned_until.get(peer_id)
        return until if until is not None and until > now else None

    def is_banned(self, peer_id: str, now: float) -> bool:
        return self.banned_until(peer_id, now) is not None

    def failures(self, peer_id: str) -> int:
        return self._failures.get(peer_id, 0)


def missing_ranges(servers: Iterable[ServerSpan], start: int, end: int) -> list[tuple[int, int]]:
    """Maximal ranges inside ``[start, end)`` that no server in ``servers`` covers."""
    covered = [False] * (end - start)
    for s in servers:
        for b in range(max(s.start, start), min(s.end, end)):
            covered[b - start] = True
    out: list[tuple[int, int]] = []
    run = None
    for i, ok in enumerate(covered):
        if not ok and run is None:
            run = start + i
        elif ok and run is not None:
            out.append((run, start + i))
            run = None
    if run is not None:
        out.append((run, end))
    return out


def _block_time(server: ServerSpan, params: RoutingParams, measured: Mapping[str, float] | None = None) -> float:
    """Seconds per block of a decode step: announced (with load), or measured where that is slower
    (an announcement is believed only as far as measurement supports it; client/measurements.py)."""
    tps = server.inference_tps if server.inference_tps > 0 and math.isfinite(server.inference_tps) else params.default_tps
    announced = (1.0 + params.load_weight * max(0, server.sessions)) / (tps * max(1, server.n_blocks))
    seen = (measured or {}).get(server.peer_id)
    return max(announced, seen) if seen is not None and math.isfinite(seen) else announced


def _rtt(server: ServerSpan, rtts: Mapping[str, float], params: RoutingParams) -> float:
    rtt = rtts.get(server.peer_id)
    if rtt is None or not math.isfinite(rtt) or rtt < 0:
        rtt = params.default_rtt
    return max(rtt, params.min_rtt)


def route_cost(route: Iterable[RouteSpan], rtts: Mapping[str, float], params: RoutingParams = RoutingParams(),
               measured: Mapping[str, float] | None = None) -> float:
    """Expected seconds per decode token of ``route`` under the cost model (no jitter)."""
    return sum(_rtt(r.server, rtts, params) + (r.end - r.start) * _block_time(r.server, params, measured)
               for r in route)


@dataclass(frozen=True)
class DeadlineParams:
    """How an inference step's deadline per span is set (see ``step_deadline``)."""

    floor: float = 5.0  # s, no deadline is shorter (scheduling noise, a busy node's queue)
    factor: float = 8.0  # slack: deadline = factor x expected time
    ceiling: float = 60.0  # s per ``ceiling_tokens`` of work: no deadline is longer, whatever the estimate
    ceiling_tokens: int = 512  # batch x tokens one ceiling covers (a node's default compute slice)


def expected_step_time(
    server: ServerSpan,
    start: int,
    end: int,
    batch: int,
    tokens: int,
    rtt: float | None,
    params: RoutingParams = RoutingParams(),
) -> float:
    """Expected seconds for ``server`` to return one step of ``batch x tokens`` new tokens over
    blocks ``[start, end)``: the first token at its decode rate, the others at its batched
    forward rate (never faster than decode), for the share of its span used, plus a round trip
    each way (the push in, the result back)."""
    decode = server.inference_tps if server.inference_tps > 0 and math.isfinite(server.inference_tps) else params.default_tps
    batched = server.forward_tps if server.forward_tps > 0 and math.isfinite(server.forward_tps) else 0.0
    batched = max(batched, decode)
    share = max(1, end - start) / max(1, server.n_blocks)
    compute = share * (1.0 / decode + max(0, batch * tokens - 1) / batched)
    if rtt is None or not math.isfinite(rtt) or rtt < 0:
        rtt = params.default_rtt
    return compute + 2 * max(rtt, params.min_rtt)


def step_deadline(expected: float, params: DeadlineParams = DeadlineParams(), work: int = 1) -> float:
    """``clamp(factor x expected, floor, ceiling x ceil(work / ceiling_tokens))``: seconds to wait for
    one span's result of a step of ``work`` = batch x tokens new tokens."""
    ceiling = params.ceiling * max(1, math.ceil(max(1, work) / max(1, params.ceiling_tokens)))
    return min(ceiling, max(params.floor, params.factor * expected))


def find_route(
    servers: Iterable[ServerSpan],
    start: int,
    end: int,
    *,
    now: float,
    rng: random.Random,
    rtts: Mapping[str, float] | None = None,
    health: PeerHealth | None = None,
    needed_cache_tokens: int = 0,
    params: RoutingParams = RoutingParams(),
    model: str = "",
    measured: Mapping[str, float] | None = None,
) -> list[RouteSpan]:
    """The chain of least expected latency covering blocks ``[start, end)``. ``measured``: peer ->
    measured seconds per block of a decode step (client/measurements.py); a node costs the slower of
    its announcement and its measurement.

    Raises ``MissingBlocksError`` when some block has no usable server.
    """
    if not 0 <= start < end:
        raise ValueError(f"bad block range [{start}, {end})")
    rtts = rtts or {}
    found = [s for s in servers if s.start < end and s.end > start and s.start < s.end]
    usable: list[ServerSpan] = []
    banned: list[ServerSpan] = []
    excluded: dict[str, str] = {}
    for s in found:
        if not s.online:
            excluded[s.peer_id] = "not online"
        elif s.cache_tokens_left < needed_cache_tokens:
            excluded[s.peer_id] = f"only {s.cache_tokens_left} cache tokens left, {needed_cache_tokens} needed"
        elif health is not None and health.is_banned(s.peer_id, now):
            excluded[s.peer_id] = f"failed recently, avoided for {health.banned_until(s.peer_id, now) - now:.0f} s"
            banned.append(s)
        else:
            usable.append(s)
    last_resort: set[int] = set()
    if banned and missing_ranges(usable, start, end) and not missing_ranges(usable + banned, start, end):
        # A peer that failed recently (perhaps only slow, not dead) beats no route at all;
        # the penalty keeps it to the blocks no healthy peer serves.
        last_resort = {id(s) for s in banned}
        usable += banned
    missing = missing_ranges(usable, start, end)
    if missing:
        raise MissingBlocksError(missing, sorted(found, key=lambda s: (s.start, s.end, s.peer_id)), excluded, model)

    # One jitter per server for this call: a consistent preference, random among near-equals.
    jitter = {id(s): 1.0 + rng.random() * params.tie_jitter for s in usable}
    bounds = sorted({start, end} | {b for s in usable for b in (s.start, s.end) if start < b < end})
    # Dijkstra over boundaries; an edge is one server serving [i, j) with both inside its span.
    best: dict[int, float] = {start: 0.0}
    prev: dict[int, tuple[int, ServerSpan]] = {}
    heap: list[tuple[float, int]] = [(0.0, start)]
    done: set[int] = set()
    while heap:
        cost, i = heapq.heappop(heap)
        if i in done:
            continue
        done.add(i)
        if i == end:
            break
        for s in usable:
            if not s.start <= i < s.end:
                continue
            base = _rtt(s, rtts, params) * jitter[id(s)]
            per_block = _block_time(s, params, measured) * jitter[id(s)]
            if id(s) in last_resort:
                per_block += params.last_resort_penalty
            for j in bounds:
                if j <= i or j > min(s.end, end):
                    continue
                c = cost + base + (j - i) * per_block
                if c < best.get(j, math.inf):
                    best[j] = c
                    prev[j] = (i, s)
                    heapq.heappush(heap, (c, j))
    route: list[RouteSpan] = []
    j = end
    while j != start:
        i, s = prev[j]
        route.append(RouteSpan(s, i, j))
        j = i
    route.reverse()
    return _merge(route)


def _merge(route: list[RouteSpan]) -> list[RouteSpan]:
    """Join consecutive spans on the same server (one session instead of two)."""
    out: list[RouteSpan] = []
    for r in route:
        if out and out[-1].server is r.server and out[-1].end == r.start:
            out[-1] = RouteSpan(r.server, out[-1].start, r.end)
        else:
            out.append(r)
    return out


def format_route(route: Iterable[RouteSpan]) -> str:
    """``12D3KooWabc…: blocks 0:10 -> 12D3KooWdef…: blocks 10:30``."""
    return " -> ".join(f"{_short(r.peer_id)} blocks {r.start}:{r.end}" for r in route)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"
