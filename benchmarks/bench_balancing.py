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

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def _spawn(command: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_line(log_path: Path, prefix: str, timeout: float = 300.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        time.sleep(0.1)
    raise TimeoutError(f"no {prefix!r} line in {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")


def measure_recovery(workdir: Path) -> float:
    """Seconds from kill -9 of a node that alone serves some blocks to all 30 served again."""
    from biopetals.models.smollm2 import smollm2_path
    from biopetals.protocol.swarm_key import SwarmKey
    from biopetals.transport.keyfiles import write_swarm_key

    path = str(smollm2_path())
    key = workdir / "swarm.key"
    write_swarm_key(key, SwarmKey.generate(), overwrite=True)
    procs = [_spawn([sys.executable, "-m", "biopetals.dht.cli", "--swarm-key", str(key), "--host", "127.0.0.1",
                     "--port", "0"], workdir / "dht.log")]
    try:
        bootstrap = _wait_line(workdir / "dht.log", "/ip4/").strip()
        logs = [workdir / f"node-{i}.log" for i in range(4)]
        for log in logs:
            procs.append(_spawn([sys.executable, "-m", "biopetals.node.cli", "--model", path, "--num-blocks", "10",
                                 "--swarm-key", str(key), "--host", "127.0.0.1", "--port", "0", "--no-progress",
                                 "--no-benchmark", "--num-threads", "1", "--announce-interval", "5",
                                 "--balance-interval", "3", "--initial-peers", bootstrap], log))
        spans = []
        for log in logs:
            _wait_line(log, "READY ")
            start, end = re.search(r"blocks (\d+):(\d+) of", log.read_text()).group(1, 2)
            spans.append(range(int(start), int(end)))
        counts = [sum(b in s for s in spans) for b in range(30)]
        victim = next(i for i, s in enumerate(spans) if any(counts[b] == 1 for b in s))
        procs[1 + victim].kill()
        killed = time.monotonic()
        others = [log for i, log in enumerate(logs) if i != victim]
        moves_before = sum(log.read_text(errors="replace").count("moved to blocks") for log in others)
        while time.monotonic() - killed < 300:
            if sum(log.read_text(errors="replace").count("moved to blocks") for log in others) > moves_before:
                return time.monotonic() - killed
            time.sleep(0.1)
        raise RuntimeError("no node moved within 300 s")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def real_recovery(kills: int) -> str:
    times = []
    for run in range(kills):
        with tempfile.TemporaryDirectory(prefix="bench-balancing-") as tmp:
            times.append(measure_recovery(Path(tmp)))
            print(f"# run {run + 1}: re-covered in {times[-1]:.1f} s", flush=True)
    return ("| measure | runs | median | max |\n|---|---:|---:|---:|\n"
            f"| kill -9 of a sole server, 1 of 4 nodes -> its blocks served again (mover online) | {kills} | "
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
