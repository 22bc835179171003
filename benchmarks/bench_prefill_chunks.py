"""A long session prefill at Llama-3-8B's width, whole and in column chunks: its time, and a decode step's wait.

One block of scripts/make_llama3_8b.py's checkpoint (Llama-3-8B's exact config, 1 layer, vocab
2048, random bf16 weights; written into a temporary directory unless ``--checkpoint``) runs in
this process on the node's own compute path (node/backend.py's ``Backend``, bf16): a
``--tokens`` prefill (default 4096) as one inference step, whole (``--compute-slice-tokens``
above it) and in column chunks of each ``--slices`` (node/slices.py), against transformers'
``LlamaModel`` holding the same block (tests/support_8b.py) with a ``DynamicCache``, in the same
run. Meanwhile another peer's session sends one-token decode steps one after another: their
latency is what an honest user of a node waits while someone else's long prompt is computed
(the node's fair queue lets a step in only between two chunks). The outputs of the chunked
prefill are compared with the whole one's.

    .venv/bin/python benchmarks/bench_prefill_chunks.py [--tokens 4096] [--slices 512 1024]

What it says about a node of several blocks: the wait grows with the blocks (one chunk goes
through all of them), so a node of 8 blocks makes a decode step wait about 8x one block's chunk.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support_8b import ReferenceSpan, make_8b_checkpoint  # noqa: E402

from biopetals.models.blocks import BlockSpan  # noqa: E402
from biopetals.models.step import span_step  # noqa: E402
from biopetals.node.backend import Backend  # noqa: E402
from biopetals.node.fair_queue import current_peer  # noqa: E402
from biopetals.node.slices import plan_step_chunks  # noqa: E402

WIDTH = 4096


def hidden_states(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(1, tokens, WIDTH, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


async def prefill_with_decodes(backend: Backend, span: BlockSpan, hidden: torch.Tensor) -> tuple[float, list[float], torch.Tensor]:
    """The prefill (peer "long") while peer "honest" decodes one token at a time in its own session:
    the prefill's seconds, each decode step's seconds, and the prefill's output."""
    long_cache, honest_cache = span.allocate_cache(1, hidden.shape[1]), span.allocate_cache(1, 4)
    token = hidden_states(1, 1)
    current_peer.set("honest")
    await backend.run_step(span, honest_cache, span_step(token, 0), "bf16")  # warm: a session with one column

    async def long() -> tuple[float, torch.Tensor]:
        current_peer.set("long")
        started = time.perf_counter()
        out = await backend.run_step(span, long_cache, span_step(hidden, 0), "bf16")
        return time.perf_counter() - started, out

    task = asyncio.create_task(long())
    waits = []
    await asyncio.sleep(0.05)
    while not task.done():  # decode steps at column 1: from the second on, a truncate step (§5.6.1) back to it
        started = time.perf_counter()
        await backend.run_step(span, honest_cache, span_step(token, 1), "bf16")
        waits.append(time.perf_counter() - started)
    seconds, out = await task
    return seconds, waits, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="prefill length (default 4096)")
    p.add_argument("--slices", type=int, nargs="+", default=[512, 1024], help="--compute-slice-tokens values to run")
    p.add_argument("--checkpoint", help="a 1-layer copy written by scripts/make_llama3_8b.py (default: write one)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    args = p.parse_args()
    if args.tokens < 2 or any(s < 1 for s in args.slices):
        p.error("--tokens must be at least 2 and every --slices value at least 1")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.checkpoint) if args.checkpoint else make_8b_checkpoint(Path(tmp) / "8b-1", layers=1)
        span = BlockSpan.load(directory, 0, 1, dtype=torch.bfloat16)
        reference = ReferenceSpan.load(directory, 0, 1)
        hidden = hidden_states(args.tokens, 0)
        with torch.no_grad():
            reference.step(hidden[:, :16], reference.new_cache())  # warm-up
            started = time.perf_counter()
            reference.step(hidden, reference.new_cache())
            local = time.perf_counter() - started
        rows, whole_out = [], None
        for bound in [args.tokens, *args.slices]:
            backend = Backend(span, num_threads=args.threads, slice_tokens=bound)
            try:
                seconds, waits, out = asyncio.run(prefill_with_decodes(backend, span, hidden))
            finally:
                backend.shutdown()
            chunks = len(plan_step_chunks(1, args.tokens, bound))
            if whole_out is None:
                whole_out, diff = out, "-"
            else:
                diff = f"{(out.float() - whole_out.float()).abs().max().item():.3g}"
            name = "whole" if chunks == 1 else f"chunks of {bound}"
            rows.append((name, chunks, seconds, waits, diff))
    print(f"\nOne Llama-3-8B-shaped block (bf16, {args.threads} threads), a {args.tokens}-token prefill as one session step;"
          f" local transformers (same block, DynamicCache): {local:.2f} s ({args.tokens / local:.0f} tokens/s).\n")
    print("| prefill | chunks | seconds | tokens/s | vs local | another session's decode step while it runs, ms "
          "(median / max, steps) | max abs diff vs whole (bf16) |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for name, chunks, seconds, waits, diff in rows:
        wait = (f"{statistics.median(waits) * 1000:.0f} / {max(waits) * 1000:.0f} ({len(waits)})" if waits else
                "none ran before the prefill's end")
        print(f"| {name} | {chunks} | {seconds:.2f} | {args.tokens / seconds:.0f} | {local / seconds:.2f}x | {wait} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
