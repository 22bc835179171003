"""The in-process balancing simulation (node/balancing_sim.py): 100 nodes join and 30 % leave."""

from __future__ import annotations

import random

import pytest

from biopetals.node.balancing_sim import BalancingSim, SimNode, best_found, random_nodes, upper_bound


@pytest.mark.parametrize("seed", [1, 3])
def test_100_nodes_join_then_30_percent_leave(seed):
    nodes = random_nodes(100, random.Random(seed), blocks=(2, 8))
    sim = BalancingSim(30, random.Random(seed + 10))
    sim.join(nodes, wave=10)  # 10 at a time read the same snapshot
    joined = sim.report("joined")
    best = best_found(nodes, 30, random.Random(seed), restarts=2)
    assert joined.coverage == 1.0
    assert best <= upper_bound(nodes, 30)
    assert joined.bottleneck >= 0.85 * best, (joined, best)

    sim.leave(random.Random(seed + 20).sample(sorted(sim.nodes), 30))
    left = sim.report("left")
    moves = sim.rebalance(10)
    after = sim.report("rebalanced", moves)
    best = best_found(list(sim.nodes.values()), 30, random.Random(seed), restarts=2)
    assert after.coverage == 1.0
    assert after.bottleneck >= left.bottleneck
    assert after.bottleneck >= 0.75 * best, (left, after, best)


def test_blocks_left_unserved_are_covered_again():
    nodes = [SimNode(f"n{i}", 10, 100.0) for i in range(9)]
    sim = BalancingSim(30, random.Random(0))
    sim.join(nodes, wave=9)
    assert sorted((s.start, s.end) for s in sim.spans.values()).count((0, 10)) == 3
    sim.leave([p for p, s in sim.spans.items() if s.start == 10])  # everyone serving 10:20 dies
    assert sim.report("left").coverage == pytest.approx(2 / 3)
    moves = sim.rebalance()
    report = sim.report("rebalanced", moves)
    assert report.coverage == 1.0 and moves >= 1
    assert report.bottleneck == 20.0 == report.upper_bound  # 6 nodes of 10 tokens/s, two per third
