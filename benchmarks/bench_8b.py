"""Llama-3-8B at its own size on this machine (issue 22 items 4-5): per block, and the whole 32-layer swarm.

Checkpoints from scripts/make_llama3_8b.py (Llama-3-8B's exact config, random bf16 weights).
Every number beside local transformers on the same weights in the same run. Two parts:

**Per block** (always; a 1-layer copy of the 8B config, vocab 2048, written into a temporary
directory unless ``--block-checkpoint``): one ``biopetals-node --dtype bfloat16`` serving that
block, the client in this process (bf16 activations on the wire), against transformers'
``LlamaModel`` holding the same block (tests/support_8b.py), bf16 on the same cores:

* prefill tokens/s of one block for ``--prompts`` (default 512 4096 8000) tokens: an inference
  session's first step (the client sends it in messages of at most 4096 tokens at this width,
  client/chunking.py), against one transformers call with a ``DynamicCache``;
* decode ms/token of one block: ``--decode-tokens`` single-token steps after a 128-token prefill;
* a fine-tuning step of one block for a batch of ``--batch`` x ``--seq`` (default 8 x 512):
  Forward, then Backward with the gradient of the outputs (the node recomputes its forward,
  spec/messages.md §6.2), against transformers' forward + ``backward()`` (inputs' gradient; the
  weights are frozen in both);
* the node's load time and peak RSS; ``biopetals-manifest`` hashing and a second node fetching
  the block from the first (MB/s).

**Whole swarm** (``--full DIR``, a full checkpoint written by the script; ~20 GB of RAM): the
manifest of all 16 GB (MB/s); 4 nodes of 8 blocks, the first three from the directory and the
fourth fetching its blocks from them (load time, peak RSS per node, fetch MB/s); greedy decoding
through the 32 blocks, embeddings and LM head included (ms/token), and a ``--full-prefill``
token prefill (default 512) through the chain, against transformers' decoder layers of the
4 spans run one after another in this process (they map the same files, so they add no memory).

What the per-block numbers say about 32 blocks is printed as "extrapolated: 32 x one block"
(plus the measured per-hop cost where it applies), never as a measurement.

    .venv/bin/python benchmarks/bench_8b.py                       # per block (~10 min on 2 busy cores)
    .venv/bin/python benchmarks/bench_8b.py --quick               # small prompts and batch: checks the benchmark
    flock /work/notes/heavy.lock .venv/bin/python benchmarks/bench_8b.py --full /work/big/llama3-8b-random --no-per-block
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support_8b import ReferenceSpan, block_bytes, client_tensors, make_8b_checkpoint, proc_memory  # noqa: E402
from support_swarm import Swarm  # noqa: E402

from biopetals.client import AutoDistributedModelForCausalLM  # noqa: E402
from biopetals.client.remote_forward import remote_blocks  # noqa: E402
from biopetals.protocol.manifest import MANIFEST_FILE  # noqa: E402
from biopetals.weights.build import checkpoint_bytes  # noqa: E402
from biopetals.weights.cli import manifest_main  # noqa: E402

FULL_NODES = 4
DECODE_PREFIX = 128
LOADED = re.compile(r"loaded in ([\d.]+) s")
FETCHED = re.compile(r"fetched (\d+) chunks \(([\d.]+) MB\) in ([\d.]+) s \(([\d.]+) MB/s\) from (\d+) peers")
GiB = 1 << 30
# compute dtype of the nodes and the local reference, and the wire codec (lossless for it): --dtype
DTYPES = {"bfloat16": (torch.bfloat16, "bf16"), "float32": (torch.float32, "f32")}
PRECISION = {"name": "bfloat16", "dtype": torch.bfloat16, "codec": "bf16"}


def log(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


class Rows:
    """The benchmark's table: measure, what it covers, swarm, local, ratio, note."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []

    def add(self, measure: str, scope: str, ours: str, local: str = "—", ratio: str = "—", note: str = "") -> None:
        self.rows.append((measure, scope, ours, local, ratio, note))
        log(" | ".join(x for x in (measure, scope, ours, local, ratio, note) if x))

    def print(self) -> None:
        print("\n| measure | scope | BioPetals | local transformers | BioPetals / local | how |")
        print("|---|---|---:|---:|---:|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def speed_ratio(ours_s: float, local_s: float) -> str:
    return f"{local_s / ours_s:.2f}x speed"


# ---------------------------------------------------------------------------- swarm helpers


def manifest_seconds(directory: Path) -> float:
    """Write the manifest with biopetals-manifest's own entry point; seconds it hashed for."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        t = time.perf_counter()
        if manifest_main([str(directory), "--no-progress"]) != 0:
            raise RuntimeError(f"biopetals-manifest failed: {out.getvalue()}")
        return time.perf_counter() - t


def start_node(swarm: Swarm, model: Path, span: tuple[int, int], threads: int, *extra: str):
    """A node serving ``span``; (node, seconds from spawn to READY, its own 'loaded in' seconds)."""
    t = time.perf_counter()
    node = swarm.start_node(model, f"{span[0]}:{span[1]}", "--dtype", PRECISION["name"], "--no-benchmark",
                            "--num-threads", str(threads), "--max-session-tokens", "16384",
                            "--max-cache-tokens", "65536", *extra, timeout=1200,
                            env={"OMP_NUM_THREADS": str(threads)})
    ready = time.perf_counter() - t
    found = LOADED.search(node.output())
    return node, ready, float(found[1]) if found else float("nan")


def node_rows(rows: Rows, nodes, spans, ready_s, loaded_s, share_bytes: int) -> None:
    """One row per node: spawn to READY, peak RSS (VmHWM, now: after everything it ran)."""
    share_bytes = share_bytes * PRECISION["dtype"].itemsize // 2  # the files hold bf16
    for node, (a, b), ready, loaded in zip(nodes, spans, ready_s, loaded_s):
        mem = proc_memory(node.pid)
        share = (b - a) * share_bytes
        rows.add("node start to READY / peak RSS", f"node {a}:{b} ({share / GiB:.2f} GiB of blocks)",
                 f"{ready:.1f} s / {mem['VmHWM'] / GiB:.2f} GiB",
                 note=f"measured; its log: loaded in {loaded:.1f} s (blocks hashed against the manifest first); "
                      f"peak {(mem['VmHWM'] - share) / GiB:+.2f} GiB over its blocks")


def fetch_row(rows: Rows, node, scope: str) -> None:
    found = FETCHED.search(node.output())
    if not found:
        raise RuntimeError(f"no fetch report in the node's log:\n{node.output()[-2000:]}")
    rows.add("fetch from peers (MB/s)", f"{scope}: {found[2]} MB from {found[5]} peer(s)", f"{float(found[4]):.0f}",
             note=f"measured by the fetching node ({found[3]} s; chunks SHA-256-verified, written, fsynced)")


def client(checkpoint: Path, swarm: Swarm):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec=PRECISION["codec"], dtype=PRECISION["dtype"],
        step_timeout=1200.0, forward_timeout=1200.0)


def hidden_states(batch: int, tokens: int, seed: int) -> torch.Tensor:
    """Inputs of a middle block: RMS ~1 like the residual stream after a few random-weight blocks."""
    return torch.randn(batch, tokens, 4096, generator=torch.Generator().manual_seed(seed)).to(PRECISION["dtype"])


# ---------------------------------------------------------------------------- per block


def prefill_swarm(model, hidden: torch.Tensor) -> float:
    with model.inference_session(max_length=hidden.shape[1]) as session:
        seconds, _ = timed(lambda: session.step(hidden))
    return seconds


def prefill_local(ref: ReferenceSpan, hidden: torch.Tensor) -> float:
    seconds, _ = timed(lambda: ref.step(hidden, ref.new_cache()))
    return seconds


def decode_swarm(model, steps: int) -> list[float]:
    times = []
    with model.inference_session(max_length=DECODE_PREFIX + steps) as session:
        session.step(hidden_states(1, DECODE_PREFIX, 1))
        for i in range(steps):
            times.append(timed(lambda: session.step(hidden_states(1, 1, 100 + i)))[0])
    return times


def decode_local(ref: ReferenceSpan, steps: int) -> list[float]:
    cache = ref.new_cache()
    ref.step(hidden_states(1, DECODE_PREFIX, 1), cache)
    return [timed(lambda: ref.step(hidden_states(1, 1, 100 + i), cache))[0] for i in range(steps)]


def finetune_swarm(model, batch: int, seq: int) -> tuple[float, float]:
    """(Forward seconds, Backward seconds) of one block for a batch."""
    hidden = hidden_states(batch, seq, 2).requires_grad_(True)
    forward_s, out = timed(lambda: remote_blocks(model.swarm, hidden))
    grad = hidden_states(batch, seq, 3) * 1e-3
    backward_s, _ = timed(lambda: out.backward(grad))
    assert hidden.grad is not None and hidden.grad.shape == hidden.shape
    return forward_s, backward_s


def finetune_local(ref: ReferenceSpan, batch: int, seq: int) -> tuple[float, float]:
    hidden = hidden_states(batch, seq, 2).requires_grad_(True)
    forward_s, out = timed(lambda: ref(hidden))
    grad = hidden_states(batch, seq, 3) * 1e-3
    backward_s, _ = timed(lambda: out.backward(grad))
    return forward_s, backward_s


def per_block(args, rows: Rows, work: Path) -> None:
    if args.block_checkpoint:
        checkpoint = Path(args.block_checkpoint)
    else:
        seconds, checkpoint = timed(lambda: make_8b_checkpoint(work / "llama3-8b-1-layer", 1, 2048))
        log(f"wrote the 1-layer copy in {seconds:.1f} s")
    hashed = manifest_seconds(checkpoint)
    size = checkpoint_bytes(checkpoint)
    rows.add("biopetals-manifest (MB/s)", f"1-layer copy, {size / 1e6:.0f} MB", f"{size / 1e6 / hashed:.0f}",
             note="measured (page cache warm: just written)")
    share = block_bytes(checkpoint)
    ref = ReferenceSpan.load(checkpoint, 0, 1, PRECISION["dtype"])
    torch.set_num_threads(args.threads)
    with Swarm(work) as swarm:
        node, ready, loaded = start_node(swarm, checkpoint, (0, 1), args.threads)
        model = client(checkpoint, swarm)
        try:
            prefill_swarm(model, hidden_states(1, 16, 0))  # warm-up: route, connection, first pages
            prefill_local(ref, hidden_states(1, 16, 0))
            for tokens in args.prompts:
                hidden = hidden_states(1, tokens, tokens)
                ours = prefill_swarm(model, hidden)
                local = prefill_local(ref, hidden)
                rows.add(f"prefill {tokens} tokens (tokens/s)", "one block", f"{tokens / ours:.0f}",
                         f"{tokens / local:.0f}", speed_ratio(ours, local),
                         f"measured ({ours:.1f} s / {local:.1f} s); the node gets it in "
                         f"{-(-tokens // 4096)} message(s)")
                rows.add(f"prefill {tokens} tokens, 32 blocks (s)", "Llama-3-8B, all blocks",
                         f"{32 * ours:.0f}", f"{32 * local:.0f}", "—", "EXTRAPOLATED: 32 x one block")
            ours = statistics.median(decode_swarm(model, args.decode_tokens))
            local = statistics.median(decode_local(ref, args.decode_tokens))
            rows.add("decode (ms/token)", f"one block, after {DECODE_PREFIX} tokens", f"{1000 * ours:.1f}",
                     f"{1000 * local:.1f}", speed_ratio(ours, local),
                     f"measured, median of {args.decode_tokens} steps (one network round trip each)")
            fwd, bwd = finetune_swarm(model, args.batch, args.seq)
            lfwd, lbwd = finetune_local(ref, args.batch, args.seq)
            rows.add(f"fine-tuning step {args.batch} x {args.seq} (s)", "one block, forward + backward",
                     f"{fwd + bwd:.1f} ({fwd:.1f} + {bwd:.1f})", f"{lfwd + lbwd:.1f} ({lfwd:.1f} + {lbwd:.1f})",
                     speed_ratio(fwd + bwd, lfwd + lbwd),
                     "measured; the node's Backward recomputes its forward (spec/messages.md §6.2)")
            rows.add(f"fine-tuning step {args.batch} x {args.seq}, 32 blocks (s)", "Llama-3-8B, all blocks",
                     f"{32 * (fwd + bwd):.0f}", f"{32 * (lfwd + lbwd):.0f}", "—",
                     "EXTRAPOLATED: 32 x one block (the client's embeddings and LM head not included)")
        finally:
            model.close()
        node_rows(rows, [node], [(0, 1)], [ready], [loaded], share)
        fetcher, fready, floaded = start_node(swarm, checkpoint / MANIFEST_FILE, (0, 1), args.threads,
                                              "--weights-dir", str(work / "fetched-1-layer"))
        fetch_row(rows, fetcher, "one block")
        rows.add("node start from the manifest alone: spawn to READY / 'loaded in'", "node 0:1, fetching its block",
                 f"{fready:.1f} s / {floaded:.1f} s", note="measured; includes the fetch")


# ---------------------------------------------------------------------------- whole swarm


def greedy_swarm(model, ids: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand through the chain (embeddings, blocks on the nodes, norm, LM head);
    the new tokens and the seconds of each decode step (the prefill of ``ids`` is not counted)."""
    tokens, times = [], []
    with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + steps + 1) as session:
        hidden = session.step(model.model.embed_tokens(ids))
        nxt = model.lm_head(model.model.norm(hidden[:, -1:])).argmax(-1)
        for _ in range(steps):
            tokens.append(int(nxt))
            t = time.perf_counter()
            hidden = session.step(model.model.embed_tokens(nxt))
            nxt = model.lm_head(model.model.norm(hidden[:, -1:])).argmax(-1)
            times.append(time.perf_counter() - t)
    return tokens, times


class LocalReference:
    """transformers' decoder layers of the 4 spans (each from the directory its node maps), with the
    client's embeddings, norm and head, and a cache per span."""

    def __init__(self, checkpoint: Path, span_dirs: list[Path], spans) -> None:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        parts = client_tensors(checkpoint)
        self.embed, self.head = parts["model.embed_tokens.weight"], parts["lm_head.weight"]
        self.norm = LlamaRMSNorm(4096, eps=1e-5).to(torch.bfloat16)
        with torch.no_grad():
            self.norm.weight.copy_(parts["model.norm.weight"])
        self.spans = [ReferenceSpan.load(d, a, b) for d, (a, b) in zip(span_dirs, spans)]

    def blocks(self, hidden: torch.Tensor, caches) -> torch.Tensor:
        for span, cache in zip(self.spans, caches):
            hidden = span.step(hidden, cache)
        return hidden

    def next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.norm(hidden[:, -1:]), self.head).argmax(-1)

    def greedy(self, ids: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
        tokens, times = [], []
        with torch.no_grad():
            caches = [span.new_cache() for span in self.spans]
            nxt = self.next_token(self.blocks(torch.nn.functional.embedding(ids, self.embed), caches))
            for _ in range(steps):
                tokens.append(int(nxt))
                t = time.perf_counter()
                nxt = self.next_token(self.blocks(torch.nn.functional.embedding(nxt, self.embed), caches))
                times.append(time.perf_counter() - t)
        return tokens, times

    def prefill(self, hidden: torch.Tensor) -> float:
        caches = [span.new_cache() for span in self.spans]
        with torch.no_grad():
            return timed(lambda: self.blocks(hidden, caches))[0]


def even_spans(n_blocks: int, n_nodes: int) -> list[tuple[int, int]]:
    cuts = [round(i * n_blocks / n_nodes) for i in range(n_nodes + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:])]


def whole_swarm(args, rows: Rows, work: Path) -> None:
    checkpoint = Path(args.full)
    config = json.loads((checkpoint / "config.json").read_text())
    layers, vocab = int(config["num_hidden_layers"]), int(config["vocab_size"])
    spans = even_spans(layers, FULL_NODES)
    size = checkpoint_bytes(checkpoint)
    hashed = manifest_seconds(checkpoint)
    rows.add("biopetals-manifest (MB/s)", f"whole checkpoint, {size / 1e9:.2f} GB", f"{size / 1e6 / hashed:.0f}",
             note=f"measured ({hashed:.0f} s, through the page cache as it was after writing)")
    share = block_bytes(checkpoint)
    torch.set_num_threads(args.threads)
    fetched = work / "fetched"
    with Swarm(work) as swarm:
        started = [start_node(swarm, checkpoint, span, args.threads) for span in spans[:-1]]
        started.append(start_node(swarm, checkpoint / MANIFEST_FILE, spans[-1], args.threads,
                                  "--weights-dir", str(fetched)))
        nodes = [s[0] for s in started]
        lowest = [available_gib()]
        log(f"4 nodes up; {lowest[0]:.1f} GiB available")
        fetch_row(rows, nodes[-1], f"blocks {spans[-1][0]}:{spans[-1][1]}")
        model = client(checkpoint, swarm)
        try:
            ids = torch.randint(0, vocab - 256, (1, 16), generator=torch.Generator().manual_seed(7))
            ours_tokens, ours_times = greedy_swarm(model, ids, args.full_decode_tokens)
            lowest.append(available_gib())
            local = LocalReference(checkpoint, [checkpoint] * 3 + [fetched], spans)
            local_tokens, local_times = local.greedy(ids, args.full_decode_tokens)
            lowest.append(available_gib())
            ours, loc = statistics.median(ours_times), statistics.median(local_times)
            rows.add("greedy decode (ms/token)", f"{layers} blocks on 4 nodes, embeddings + LM head on the client",
                     f"{1000 * ours:.0f}", f"{1000 * loc:.0f}", speed_ratio(ours, loc),
                     f"measured, median of {args.full_decode_tokens} tokens; same tokens as local: "
                     f"{'yes' if ours_tokens == local_tokens else 'NO'}")
            if args.full_prefill:
                hidden = hidden_states(1, args.full_prefill, 8)
                ours = prefill_swarm(model, hidden)
                lowest.append(available_gib())
                loc = local.prefill(hidden)
                lowest.append(available_gib())
                rows.add(f"prefill {args.full_prefill} tokens (tokens/s)", f"{layers} blocks on 4 nodes",
                         f"{args.full_prefill / ours:.0f}", f"{args.full_prefill / loc:.0f}", speed_ratio(ours, loc),
                         f"measured ({ours:.0f} s / {loc:.0f} s)")
        finally:
            model.close()
            node_rows(rows, nodes, spans, [s[1] for s in started], [s[2] for s in started], share)
            me = proc_memory(os.getpid())
            rows.add("this process: client + local reference, peak RSS", f"embeddings and LM head bf16 "
                     f"({2 * vocab * 4096 * 2 / 1e9:.1f} GB) and the 4 spans, mapped", f"{me['VmHWM'] / GiB:.2f} GiB", note=f"measured; of it not mapped "
                     f"from the files now: {me['RssAnon'] / GiB:.2f} GiB (the mapped pages are the nodes' too)")
            rows.add("machine: lowest MemAvailable seen", "24 GiB machine, everything above running",
                     f"{min(lowest):.1f} GiB", note=f"sampled {len(lowest)} times (after start, decode, prefill)")


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 4096, 8000], help="prefill lengths (per block)")
    p.add_argument("--decode-tokens", type=int, default=16, help="decode steps per block measurement (median)")
    p.add_argument("--batch", type=int, default=8, help="fine-tuning batch (default 8)")
    p.add_argument("--seq", type=int, default=512, help="fine-tuning sequence length (default 512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads, nodes and local alike")
    p.add_argument("--block-checkpoint", help="a 1-layer copy written by scripts/make_llama3_8b.py (default: write one)")
    p.add_argument("--no-per-block", action="store_true", help="skip the per-block part")
    p.add_argument("--full", metavar="DIR", help="a full checkpoint written by scripts/make_llama3_8b.py: run the "
                                                 "whole-swarm part (~20 GB of RAM: run under the heavy lock)")
    p.add_argument("--full-decode-tokens", type=int, default=8, help="greedy tokens through the whole swarm")
    p.add_argument("--full-prefill", type=int, default=512, help="prefill through the whole swarm (0: skip)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                   help="compute dtype of the nodes and of local transformers (default bfloat16; float32 doubles the "
                        "memory: the full 8B does not fit in 24 GiB: use it with the per-block part only)")
    p.add_argument("--quick", action="store_true", help="prompts 128 256, batch 2 x 64, 4 decode steps")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.batch, args.seq, args.decode_tokens = [128, 256], 2, 64, 4
        args.full_decode_tokens, args.full_prefill = 3, min(args.full_prefill, 64)
    PRECISION.update(name=args.dtype, dtype=DTYPES[args.dtype][0], codec=DTYPES[args.dtype][1])
    if args.full and args.dtype != "bfloat16":
        p.error("--full runs in bfloat16 only: a float32 8B swarm needs ~32 GB, this machine has 24 GiB")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the nodes and remove the files
    work = Path(tempfile.mkdtemp(prefix="bench-8b-"))
    rows = Rows()
    t0 = time.monotonic()
    try:
        if not args.no_per_block:
            per_block(args, rows, work)
        if args.full:
            whole_swarm(args, rows, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        rows.print()
        print(f"\n{os.cpu_count()} cores, {args.threads} torch threads per process, {args.dtype} compute, "
              f"{PRECISION['codec']} activations; "
              f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
