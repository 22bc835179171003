"""Block balancing: how close the swarm's bottleneck throughput comes to the optimum.

Part 1 (default): node/balancing_sim.py, 100 nodes deciding with the same sans-IO functions
as ``biopetals-node --num-blocks`` (node/balancing.py): they join (in waves of nodes that read
the same snapshot), then 30 % leave at random and the rest rebalance (``should_move``, quality
``--quality``). Per phase: coverage, bottleneck as a fraction of the best assignment found
offline (``best_found``: a lower bound of the optimum) and of ``sum(speed) / blocks`` (an
upper bound of it); the median over ``--seeds`` seeds.

Part 2 (``--real``): a real swarm of 4 ``biopetals-node --num-blocks 8`` processes on SmolLM2
(30 blocks) over loopback: the time from kill -9 of one node to every block being served
again by the 3 others (read from the DHT like ``biopetals-swarm``), over ``--kills`` runs.

    .venv/bin/python benchmarks/bench_balancing.py [--seeds 3] [--quality 0.75] [--real] [--kills 3]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from biopetals.node.balancing_sim import BalancingSim, best_found, random_nodes

CONFIGS = [  # (model blocks, blocks per node, join wave)
    (30, (2, 8), 1),
    (30, (2, 8), 10),
    (80, (4, 16), 1),
    (80, (4, 16), 10),
]


def simulate(n_blocks: int, blocks: tuple[int, int], wave: int, seed: int, quality: float) -> dict[str, tuple]:
    nodes = random_nodes(100, random.Random(seed), blocks=blocks)
    sim = BalancingSim(n_blocks, random.Random(seed + 1000), balance_quality=quality)
    sim.join(nodes, wave=wave)
    out = {}
    best = best_found(nodes, n_blocks, random.Random(seed), restarts=3)
    out["after 100 joins"] = (sim.report("joined"), best)
    sim.leave(random.Random(seed + 2000).sample(sorted(sim.nodes), 30))
    best = best_found(list(sim.nodes.values()), n_blocks, random.Random(seed), restarts=3)
    out["30 % left"] = (sim.report("left"), best)
    moves = sim.rebalance(10)
    out["30 % left, rebalanced"] = (sim.report("rebalanced", moves), best)
    return out


def simulation_table(seeds: int, quality: float) -> str:
    rows = ["| blocks | blocks per node | joining at once | phase | coverage | bottleneck / best found | "
            "bottleneck / upper bound | moves |", "|---|---|---|---|---:|---:|---:|---:|"]
    for n_blocks, blocks, wave in CONFIGS:
        started = time.perf_counter()
        runs = [simulate(n_blocks, blocks, wave, seed, quality) for seed in range(seeds)]
        for phase in runs[0]:
            reports = [run[phase] for run in runs]
            coverage = statistics.median(r.coverage for r, _ in reports)
            of_best = statistics.median(r.bottleneck / best for r, best in reports)
            of_bound = statistics.median(r.of_upper_bound for r, _ in reports)
            moves = statistics.median(r.moves for r, _ in reports)
            rows.append(f"| {n_blocks} | {blocks[0]}-{blocks[1]} | {wave} | {phase} | {coverage:.0%} | "
                        f"{of_best:.3f} | {of_bound:.3f} | {moves:g} |")
        print(f"# {n_blocks} blocks, waves of {wave}: {time.perf_counter() - started:.0f} s", flush=True)
    return "\n".join(rows)


def real_recovery(kills: int) -> str:
    from biopetals.node.recovery_probe import measure_recovery  # starts processes: only with --real

    times = [measure_recovery() for _ in range(kills)]
    return ("| measure | runs | median | max |\n|---|---:|---:|---:|\n"
            f"| kill -9 of 1 of 4 nodes -> all 30 blocks served again | {kills} | "
            f"{statistics.median(times):.1f} s | {max(times):.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="simulated swarms per row, median reported (default 3)")
    parser.add_argument("--quality", type=float, default=0.75, help="--balance-quality of the nodes (default 0.75)")
    parser.add_argument("--real", action="store_true", help="also time a real 4-node swarm re-covering a killed node")
    parser.add_argument("--kills", type=int, default=3, help="real runs (default 3)")
    args = parser.parse_args()
    print(simulation_table(args.seeds, args.quality))
    if args.real:
        print(real_recovery(args.kills))


if __name__ == "__main__":
    main()
