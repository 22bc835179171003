"""Client benchmark: distributed generation and batch forward over 1, 2, 3 loopback nodes vs local transformers.

For each model, in one run and side by side:

* single-sequence greedy generation (prompt of 16 tokens, ``--new-tokens`` new
  tokens, decode time only: a prefill of the prompt is timed apart), tokens/s;
* batch forward of 8 x 128 tokens (no grad), tokens/s;
* the protocol's per-token overhead: distributed ms/token minus local ms/token.

Models: the bundled SmolLM2-135M-Instruct and a random ~1B-shape Llama (hidden
2048, 8 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 32000) written
with ``save_pretrained`` into a temporary directory. Distributed runs start
``biopetals-node`` processes on 127.0.0.1 (blocks split evenly) with a fresh swarm
key; activations travel as f16 (the default codec). Everything shares this
machine's cores: local numbers run alone, distributed ones run client and nodes
together (only one computes at a time during decoding).

Target (issue 6): 2 nodes reach at least 85% of local tokens/s on the 1B shape.

    .venv/bin/python benchmarks/bench_client.py            # full run, markdown table
    .venv/bin/python benchmarks/bench_client.py --quick    # fewer tokens, SmolLM2 + 1B, 1-2 nodes
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

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm
from biopetals.models.config import load_config

PROMPT = 16
BATCH, SEQ = 8, 128


def make_1b(path: Path) -> Path:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=8, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="500MB")
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    del model
    gc.collect()
    return path


def _ids(vocab: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def measure(model, vocab: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s, batch-forward tokens/s), medians over ``repeats`` after one warm-up."""
    prompt = _ids(vocab, (1, PROMPT), 0)
    batch = _ids(vocab, (BATCH, SEQ), 1)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    decode, forward = [], []
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up (routes, connections)
        model(batch[:1, :16])
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
            decode.append(new_tokens / max(1e-9, time.perf_counter() - t - prefill))
            t = time.perf_counter()
            model(batch)
            forward.append(BATCH * SEQ / (time.perf_counter() - t))
    return statistics.median(decode), statistics.median(forward)


def local_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def spans(n_blocks: int, n_nodes: int) -> list[tuple[int, int]]:
    b = [round(i * n_blocks / n_nodes) for i in range(n_nodes + 1)]
    return [(b[i], b[i + 1]) for i in range(n_nodes)]


def bench_model(name: str, path: Path, node_counts: list[int], new_tokens: int, repeats: int,
                threads: int | None = None) -> list[dict]:
    config, _ = load_config(path)
    vocab, n_blocks = int(config.vocab_size), int(config.num_hidden_layers)
    rows = []
    model = local_model(path)
    dec, fwd = measure(model, vocab, new_tokens, repeats)
    del model
    gc.collect()
    local = {"model": name, "setup": "local transformers", "decode": dec, "forward": fwd}
    rows.append(local)
    print(f"  {name} local: {dec:.1f} tok/s decode, {fwd:.0f} tok/s forward", file=sys.stderr, flush=True)
    for n in node_counts:
        with LocalSwarm(path, spans(n_blocks, n), threads=threads) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    swarm_key=swarm.key_path)
            try:
                dec, fwd = measure(model, vocab, new_tokens, repeats)
            finally:
                model.close()
        rows.append({"model": name, "setup": f"{n} node{'s' if n > 1 else ''}", "decode": dec, "forward": fwd,
                     "overhead_ms": 1000 / dec - 1000 / local["decode"], "ratio": dec / local["decode"],
                     "fwd_ratio": fwd / local["forward"]})
        print(f"  {name} {n} node(s): {dec:.1f} tok/s decode, {fwd:.0f} tok/s forward", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| model | setup | decode tokens/s | vs local | batch forward 8x128 tokens/s | vs local | overhead ms/token |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "ratio" in r:
            out.append(f"| {r['model']} | {r['setup']} | {r['decode']:.1f} | {100 * r['ratio']:.0f}% | "
                       f"{r['forward']:.0f} | {100 * r['fwd_ratio']:.0f}% | {r['overhead_ms']:+.1f} |")
        else:
            out.append(f"| {r['model']} | {r['setup']} | {r['decode']:.1f} | 100% | {r['forward']:.0f} | 100% | — |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and 1-2 nodes only")
    p.add_argument("--new-tokens", type=int, default=None, help="decode tokens per measurement (default 32; 12 quick)")
    p.add_argument("--repeats", type=int, default=None, help="measurements per setup (median; default 2, quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the local model, the client and each node (default: torch's, one per core)")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--skip-1b", action="store_true")
    args = p.parse_args(argv)
    new_tokens = args.new_tokens or (12 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 2)
    nodes = [1, 2] if args.quick else [1, 2, 3]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    t0 = time.monotonic()
    if not args.skip_smollm2:
        from biopetals.models.smollm2 import smollm2_path

        rows += bench_model("SmolLM2-135M", smollm2_path(), nodes, new_tokens, repeats, args.threads)
    if not args.skip_1b:
        with tempfile.TemporaryDirectory(prefix="bench-1b-") as tmp:
            path = make_1b(Path(tmp) / "llama-1b-shape")
            rows += bench_model("Llama 1B-shape (8 x 2048)", path, nodes, new_tokens, repeats, args.threads)
    print(f"\n{table(rows)}\n")
    print(f"fp32 compute, f16 activations on the wire, {torch.get_num_threads()} torch threads per process, "
          f"{new_tokens} decode tokens per measurement; total {time.monotonic() - t0:.0f} s")
    target = [r for r in rows if r["model"].startswith("Llama 1B") and r["setup"] == "2 nodes"]
    if target:
        ok = target[0]["ratio"] >= 0.85
        print(f"target: 2 nodes >= 85% of local decode tokens/s on the 1B shape: "
              f"{100 * target[0]['ratio']:.0f}% -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
