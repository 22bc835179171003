"""Kademlia at scale: lookups in an in-memory swarm of 1000+ DHT nodes, 0 % and 30 % dead.

Drives dht/simulation.py (the same sans-IO routing, lookup, storage and message
codec as a real node) and prints a markdown table: lookup success rate, rounds
(network round trips) and messages per lookup. Goal (issue 4): 100 % success and
median rounds <= ceil(log2 N).

    .venv/bin/python benchmarks/bench_dht_sim.py [--nodes 1000] [--lookups 200] [--seed 0]
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import math
import time

from biopetals.dht.simulation import markdown_table, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1000], help="swarm sizes (default 1000)")
    parser.add_argument("--lookups", type=int, default=200, help="lookups of each kind per row (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    for n in args.nodes:
        start = time.perf_counter()
        rows += run_experiment(n, lookups=args.lookups, seed=args.seed)
        print(f"# {n} nodes simulated in {time.perf_counter() - start:.1f} s; goal: median rounds <= "
              f"ceil(log2 N) = {math.ceil(math.log2(n))}")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
