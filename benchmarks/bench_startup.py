"""Start-up benchmark (issue 23 item 5): from starting two nodes to the first generated token, phase by phase.

Starts two ``biopetals-node`` processes on 127.0.0.1 as an operator would (the default
start-up throughput measurement on; the second node joining through the first), then, in
this process, loads the client (``from_pretrained``), finds a route and generates one
token. Node phases come from the nodes' own ``startup`` marks (node/startup_trace.py,
logged with ``-v``: wall clock and the node's CPU time); client phases are timed here.
The client's imports happened before the clock starts (a program or notebook already
running). Models: a tiny random Llama (8 layers, hidden 64) and a ~1B-shape Llama
(8 x 2048, as benchmarks/bench_client.py; random weights, written once with
``save_pretrained`` into ``--workdir`` and then read from the page cache).

Throughput cache (node/throughput_cache.py): ``cold`` starts every run with a new, empty cache
file (a node's first start on a machine: the nodes measure, and the second node reads the
first's entry if it is written in time); ``warm`` with a file a first, untimed start wrote
(every later start: no node measures); ``none`` passes ``--throughput-cache none`` (always measure).

    .venv/bin/python benchmarks/bench_startup.py                  # both models, cold and warm, median of 3
    .venv/bin/python benchmarks/bench_startup.py --models tiny --repeats 1 --cache warm

The 1B shape holds ~2.5 GB per copy: run it under the machine's memory lock
(``flock /work/notes/heavy.lock ...``) where memory is shared.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_client import make_1b  # noqa: E402

from biopetals.client import AutoDistributedModelForCausalLM  # noqa: E402
from biopetals.client.local_swarm import LocalSwarm  # noqa: E402
from biopetals.node.startup_trace import PREFIX  # noqa: E402

#: The node's marks in order, and the phase each one ends.
NODE_PHASES = [
    ("imports", "process start and imports"),
    ("listening", "listen"),
    ("dht-joined", "DHT join"),
    ("heavy-imports", "imports of torch and transformers (after the DHT join)"),
    ("joining-announced", "announce JOINING"),
    ("weights-loaded", "weights"),
    ("throughput-measured", "start-up throughput measurement (or its cache read)"),
    ("online-announced", "announce ONLINE"),
]
CLIENT_PHASES = ["client from_pretrained", "routing", "first step (1 token)"]


def make_tiny(path: Path) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="100KB")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(path)
    return path


class TracedSwarm(LocalSwarm):
    """A LocalSwarm whose nodes log their start-up marks (``-v``); ``started[i]``: when node i's process began."""

    def __init__(self, *args, **kwargs) -> None:
        self.started: list[float] = []
        super().__init__(*args, **kwargs)

    def add_node(self, start: int, end: int):  # LocalSwarm before issue 23: one node after the other
        self.started.append(time.time())
        return super().add_node(start, end)

    def _launch(self, start: int, end: int):  # since: the next starts on the DHT line of the one before
        self.started.append(time.time())
        return super()._launch(start, end)


def node_marks(lines: list[str]) -> dict[str, tuple[float, float]]:
    """``{phase: (wall, cpu)}`` from a node's output lines."""
    out = {}
    for line in lines:
        at = line.find(PREFIX)
        if at < 0:
            continue
        phase, wall, cpu = line[at + len(PREFIX):].split()
        out[phase] = (float(wall.removeprefix("wall=")), float(cpu.removeprefix("cpu=")))
    return out


def one_run(path: Path, n_blocks: int, extra: list[str]) -> dict[str, tuple[float, float | None]]:
    """``{phase: (wall seconds, cpu seconds or None)}`` of one start, plus ``total``."""
    half = n_blocks // 2
    t0 = time.time()
    swarm = TracedSwarm(path, [(0, half), (half, n_blocks)], benchmark=True, extra_args=["-v", *extra])
    try:
        phases: dict[str, tuple[float, float | None]] = {}
        for i, node in enumerate(swarm.nodes):
            marks = node_marks(node.lines)
            prev_wall, prev_cpu = swarm.started[i], 0.0
            for key, label in NODE_PHASES:
                if key not in marks:
                    continue
                wall, cpu = marks[key]
                phases[f"node {i + 1}: {label}"] = (wall - prev_wall, cpu - prev_cpu)
                prev_wall, prev_cpu = wall, cpu
        phases["nodes: all READY (wall, from the first start)"] = (time.time() - t0, None)
        c0 = time.process_time()
        t = time.time()
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                swarm_key=swarm.key_path)
        try:
            t1, c1 = time.time(), time.process_time()
            model.swarm.loop.run(model.swarm.find_route(0, n_blocks))
            t2, c2 = time.time(), time.process_time()
            with torch.no_grad():
                model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=1, do_sample=False, pad_token_id=3)
            t3, c3 = time.time(), time.process_time()
        finally:
            model.close()
        phases["client from_pretrained"] = (t1 - t, c1 - c0)
        phases["routing"] = (t2 - t1, c2 - c1)
        phases["first step (1 token)"] = (t3 - t2, c3 - c2)
        phases["total: first node start to first token"] = (t3 - t0, None)
    finally:
        swarm.close()
    return phases


def median_phases(runs: list[dict]) -> dict[str, tuple[float, float | None]]:
    out = {}
    for key in runs[0]:
        walls = [r[key][0] for r in runs if key in r]
        cpus = [r[key][1] for r in runs if key in r and r[key][1] is not None]
        out[key] = (statistics.median(walls), statistics.median(cpus) if cpus else None)
    return out


def table(results: dict[str, dict], label: str) -> str:
    names = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    out = [f"| phase ({label}) | " + " | ".join(f"{n} wall s | {n} CPU s" for n in names) + " |",
           "|---|" + "---:|---:|" * len(names)]
    for key in keys:
        cells = []
        for n in names:
            wall, cpu = results[n].get(key, (None, None))
            cells.append("—" if wall is None else f"{wall:.2f}")
            cells.append("—" if cpu is None else f"{cpu:.2f}")
        bold = "**" if key.startswith("total") else ""
        out.append(f"| {bold}{key}{bold} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=["tiny", "1b"], default=["tiny", "1b"])
    p.add_argument("--repeats", type=int, default=3, help="starts per model; the table shows medians (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/biopetals-bench-startup"),
                   help="where the checkpoints are written once (default /tmp/biopetals-bench-startup)")
    p.add_argument("--label", default="this tree", help="the column label, e.g. before/after")
    p.add_argument("--cache", nargs="+", choices=["cold", "warm", "none"], default=["cold", "warm"],
                   help="throughput cache of the nodes, one column each (default: cold warm; see above)")
    p.add_argument("--node-args", nargs=argparse.REMAINDER, default=[],
                   help="more biopetals-node options for both nodes (last on the line)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    results = {}
    for name in args.models:
        path = args.workdir / name
        if not (path / "config.json").is_file():
            (make_tiny if name == "tiny" else make_1b)(path)
            gc.collect()
        label = "tiny" if name == "tiny" else "1B shape"
        for mode in args.cache:
            with tempfile.TemporaryDirectory(prefix="bench-startup-cache-") as tmp:
                warm = Path(tmp) / "warm.json"
                if mode == "warm":  # a first start writes the cache; not timed
                    one_run(path, 8, ["--throughput-cache", str(warm), *args.node_args])
                runs = []
                for i in range(args.repeats):
                    cache = {"cold": str(Path(tmp) / f"cold-{i}.json"), "warm": str(warm), "none": "none"}[mode]
                    runs.append(one_run(path, 8, ["--throughput-cache", cache, *args.node_args]))
                    total = runs[-1]["total: first node start to first token"][0]
                    print(f"  {name} {mode} cache, run {i + 1}: {total:.2f} s to the first token", file=sys.stderr,
                          flush=True)
            results[f"{label}, {mode} cache"] = median_phases(runs)
    print(f"\n{table(results, args.label)}\n")
    print(f"medians of {args.repeats} start(s); node CPU s is the node process's own; 2 nodes x 4 blocks, fp32, "
          f"CPU; load average now {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
