"""A swarm of nodes choosing and rebalancing their blocks, in one process, for tests and benchmarks.

Every node decides with the same sans-IO functions as a real one (node/balancing.py):
``choose_best_span`` when it joins, ``resolve_join`` while it settles, ``should_move``
when it re-evaluates. The swarm is lock-step: a *wave* of joiners reads the same
snapshot (they join concurrently), then settles in rounds; a *rebalancing round* lets
every node, in random order, re-evaluate once and move at once. No asyncio, no clock.

A node ``i`` has a compute speed ``c_i`` (block-tokens/s) and serves ``k_i`` blocks, so its
throughput through each of them is ``c_i / k_i``. The bottleneck of any assignment is at
most ``sum(c_i) / n_blocks`` (the average block's throughput): ``upper_bound``. The
optimum lies between the best assignment a search finds (``best_found``: joins in
random orders then Petals' local search, several restarts) and that bound.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .balancing import (
    DEFAULT_BALANCE_QUALITY,
    ServedSpan,
    block_throughputs,
    bottleneck,
    choose_best_span,
    resolve_join,
    should_move,
)
from biopetals.protocol.announcement import State

__all__ = ["SimNode", "PhaseReport", "BalancingSim", "random_nodes", "upper_bound", "best_found"]


@dataclass(frozen=True)
class SimNode:
    peer_id: str
    num_blocks: int
    speed: float  # block-tokens/s: its throughput through each block is speed / num_blocks

    @property
    def throughput(self) -> float:
        return self.speed / self.num_blocks


@dataclass(frozen=True)
class PhaseReport:
    phase: str
    nodes: int
    coverage: float  # fraction of the blocks with at least one node
    bottleneck: float
    upper_bound: float
    moves: int = 0  # rebalancing moves in this phase

    @property
    def of_upper_bound(self) -> float:
        return self.bottleneck / self.upper_bound if self.upper_bound > 0 else 0.0


def random_nodes(count: int, rng: random.Random, *, blocks: tuple[int, int] = (4, 16), speed_sigma: float = 0.5,
                 prefix: str = "n") -> list[SimNode]:
    """``count`` nodes with ``num_blocks`` uniform in ``blocks`` and log-normal speeds (median 100)."""
    width = len(str(count))
    return [SimNode(f"{prefix}{i:0{width}d}-{rng.getrandbits(32):08x}", rng.randint(*blocks),
                    100.0 * rng.lognormvariate(0.0, speed_sigma)) for i in range(count)]


def upper_bound(nodes: list[SimNode], n_blocks: int) -> float:
    """No assignment's bottleneck exceeds the average block throughput: ``sum(speed) / n_blocks``."""
    return sum(n.speed for n in nodes) / n_blocks


@dataclass
class BalancingSim:
    n_blocks: int
    rng: random.Random
    balance_quality: float = DEFAULT_BALANCE_QUALITY
    settle_rounds: int = 6
    nodes: dict[str, SimNode] = field(default_factory=dict)
    spans: dict[str, ServedSpan] = field(default_factory=dict)

    def _served(self, peer: str, span: tuple[int, int], state: State = State.ONLINE) -> ServedSpan:
        return ServedSpan(peer, span[0], span[1], self.nodes[peer].throughput, state)

    def join(self, joiners: list[SimNode], wave: int = 1) -> None:
        """Join ``joiners`` in waves of ``wave`` nodes that read the same snapshot, each wave settling."""
        for i in range(0, len(joiners), wave):
            batch = joiners[i : i + wave]
            snapshot = list(self.spans.values())
            for node in batch:
                self.nodes[node.peer_id] = node
            for node in batch:  # all chose from the same view
                span = choose_best_span(snapshot, self.n_blocks, node.num_blocks, node.throughput, self.rng)
                self.spans[node.peer_id] = self._served(node.peer_id, span, State.JOINING)
            for _ in range(self.settle_rounds):
                moved = False
                for node in self.rng.sample(batch, len(batch)):
                    mine = self.spans[node.peer_id]
                    better = resolve_join(self.spans.values(), node.peer_id, (mine.start, mine.end), self.n_blocks,
                                          node.throughput, self.rng)
                    if better is not None:
                        self.spans[node.peer_id] = self._served(node.peer_id, better, State.JOINING)
                        moved = True
                if not moved:
                    break
            for node in batch:
                s = self.spans[node.peer_id]
                self.spans[node.peer_id] = self._served(node.peer_id, (s.start, s.end))

    def leave(self, peers: list[str]) -> None:
        for peer in peers:
            self.nodes.pop(peer, None)
            self.spans.pop(peer, None)

    def rebalance(self, rounds: int = 10) -> int:
        """Up to ``rounds`` rounds (each node re-evaluates once, random order); stops after a round
        without a move. Returns the moves made."""
        moves = 0
        for _ in range(rounds):
            moved = 0
            for peer in self.rng.sample(sorted(self.spans), len(self.spans)):
                target = should_move(self.spans.values(), peer, self.n_blocks, self.rng, self.balance_quality)
                if target is not None:
                    self.spans[peer] = self._served(peer, target)
                    moved += 1
            moves += moved
            if not moved:
                break
        return moves

    def throughputs(self) -> list[float]:
        return block_throughputs(self.spans.values(), self.n_blocks)

    def report(self, phase: str, moves: int = 0) -> PhaseReport:
        t = self.throughputs()
        return PhaseReport(phase, len(self.nodes), sum(1 for x in t if x > 0) / self.n_blocks, bottleneck(t),
                           upper_bound(list(self.nodes.values()), self.n_blocks), moves)


def best_found(nodes: list[SimNode], n_blocks: int, rng: random.Random, restarts: int = 5) -> float:
    """The best bottleneck found offline: each restart joins the nodes one by one in a random
    order (largest first in the first restart), then runs Petals' local search (every node takes
    its best place, quality > 1) until nobody moves. A lower bound of the optimum."""
    best = 0.0
    for r in range(restarts):
        order = sorted(nodes, key=lambda n: -n.speed) if r == 0 else rng.sample(nodes, len(nodes))
        sim = BalancingSim(n_blocks, random.Random(rng.getrandbits(32)), balance_quality=1.5)
        sim.join(order)
        sim.rebalance(rounds=20)
        best = max(best, bottleneck(sim.throughputs()))
    return best
