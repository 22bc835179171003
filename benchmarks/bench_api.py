"""API benchmark: time to first token and tokens/s per stream, 1, 4 and 16 concurrent chat streams.

Against a local 3-node swarm (``biopetals-node`` processes on 127.0.0.1 splitting the
bundled SmolLM2-135M-Instruct 0:10, 10:20, 20:30, f16 activations), side by side in one run:

* **API**: ``biopetals-api`` as its own process (``--max-sessions 16``); N threads each send
  one streaming chat request through the official ``openai`` client (greedy, exactly
  ``--new-tokens`` tokens via ``min_tokens``); time to first token = request sent to the
  first content chunk received; tokens/s per stream = (tokens - 1) / (last chunk - first chunk).
* **Python client**: the same N questions through the client library in this process, one
  ``DistributedLlamaForCausalLM`` per thread sharing one ``RemoteSwarm`` (as the API server
  does), ``generate()`` with a streamer; first token = the streamer's first token.

Each concurrency level runs the client, then the API, ``--repeats`` times (median of the
per-stream medians is reported). All processes share this machine's cores; the last column
is the CPU time the API server process and the node processes spent per generated token
during the API runs (where the time goes).

    .venv/bin/python benchmarks/bench_api.py [--new-tokens 32] [--repeats 2] [--streams 1 4 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import torch  # noqa: E402

from biopetals.client.local_swarm import LocalSwarm  # noqa: E402

QUESTIONS = [
    "What does the mitochondria do in a cell?", "What do ribosomes do?", "How does DNA replication start?",
    "What is an enzyme?", "Why do cells divide?", "What is photosynthesis?", "What are antibodies?",
    "How do neurons signal?", "What does the liver do?", "What is a gene?", "What is RNA polymerase?",
    "How do vaccines work?", "What is a virus?", "What is the Krebs cycle?", "What is meiosis?",
    "What does insulin do?",
]


def _summary(ttfts: list[float], rates: list[float], wall: float, tokens: int) -> dict:
    return {"ttft": statistics.median(ttfts), "ttft_max": max(ttfts), "tps": statistics.median(rates),
            "total_tps": tokens / wall}


def run_api(url: str, model: str, n: int, new_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    ttfts, rates, counts = [], [], []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.monotonic()
        first = last = None
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], temperature=0,
            max_tokens=new_tokens, stream=True, stream_options={"include_usage": True},
            extra_body={"min_tokens": new_tokens})
        tokens = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.monotonic()
                first = first or last
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        ttfts.append(first - t0)
        rates.append((tokens - 1) / (last - first))
        counts.append(tokens)

    wall = _threads(n, one)
    return _summary(ttfts, rates, wall, sum(counts))


def run_client(engine, n: int, new_tokens: int) -> dict:
    from transformers.generation.streamers import BaseStreamer

    ttfts, rates = [], []
    barrier = threading.Barrier(n)

    class Times(BaseStreamer):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def put(self, value) -> None:
            self.calls.append(time.monotonic())  # first call: the prompt; then one per token

        def end(self) -> None:
            pass

    def one(i: int) -> None:
        model = engine.models[i]
        enc = engine.chat_inputs([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        streamer = Times()
        barrier.wait()
        t0 = time.monotonic()
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           streamer=streamer, pad_token_id=engine.pad_token_id)
        tokens = streamer.calls[1:]
        ttfts.append(tokens[0] - t0)
        rates.append((len(tokens) - 1) / (tokens[-1] - tokens[0]))

    wall = _threads(n, one)
    return _summary(ttfts, rates, wall, n * new_tokens)


def _threads(n: int, target) -> float:
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.monotonic() - t0


def cpu_seconds(api_pid: int, swarm: LocalSwarm) -> tuple[float, float]:
    """CPU seconds used so far by the API server process and by all node processes together."""
    import psutil

    def cpu(pid: int) -> float:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system

    return cpu(api_pid), sum(cpu(n.process.pid) for n in swarm.nodes)


def start_api(path: Path, swarm: LocalSwarm, log: Path, max_sessions: int):
    import subprocess

    cmd = [sys.executable, "-m", "biopetals.api.cli", "--model", str(path), "--swarm-key", str(swarm.key_path),
           "--initial-peers", *swarm.initial_peers, "--host", "127.0.0.1", "--port", "0",
           "--max-sessions", str(max_sessions)]
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("READY "):
                return proc, line.split()[1]
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("biopetals-api not ready")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per stream (default 32)")
    p.add_argument("--repeats", type=int, default=2, help="runs per concurrency level (default 2)")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels (default 1 4 16)")
    args = p.parse_args(argv)

    from biopetals.api.engine import Engine
    from biopetals.models.smollm2 import smollm2_path

    path = smollm2_path()
    most = max(args.streams)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(path, [(0, 10), (10, 20), (20, 30)]) as swarm:
        proc, url = start_api(path, swarm, Path(tmp) / "api.log", most)
        engine = Engine(path, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, max_sessions=most)
        try:
            run_client(engine, 1, 4)  # warm up: connections, routes
            run_api(url, engine.served_name, 1, 4)
            for n in args.streams:
                got = {"client": [], "api": []}
                for _ in range(args.repeats):
                    got["client"].append(run_client(engine, n, args.new_tokens))
                    before = cpu_seconds(proc.pid, swarm)
                    got["api"].append(run_api(url, engine.served_name, n, args.new_tokens))
                    after = cpu_seconds(proc.pid, swarm)
                    tokens = n * args.new_tokens
                    got["api"][-1]["api_cpu_ms"] = (after[0] - before[0]) / tokens * 1000
                    got["api"][-1]["nodes_cpu_ms"] = (after[1] - before[1]) / tokens * 1000
                for how, runs in got.items():
                    row = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
                    rows.append({"streams": n, "how": how, **row})
                    print(rows[-1], file=sys.stderr, flush=True)
        finally:
            engine.close()
            proc.terminate()
            proc.wait(20)
    print(f"SmolLM2-135M-Instruct, 3 nodes on 127.0.0.1, {args.new_tokens} new tokens per stream, greedy, "
          f"median of {args.repeats} runs\n")
    print("| streams | through | time to first token: median / max | tokens/s per stream (median) | tokens/s all streams "
          "| CPU ms per token: API server / 3 nodes |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        how = "API (openai client, SSE)" if r["how"] == "api" else "Python client"
        cpu = f"{r['api_cpu_ms']:.0f} / {r['nodes_cpu_ms']:.0f}" if r["how"] == "api" else "—"
        print(f"| {r['streams']} | {how} | {r['ttft'] * 1000:.0f} ms / {r['ttft_max'] * 1000:.0f} ms | "
              f"{r['tps']:.1f} | {r['total_tps']:.1f} | {cpu} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
