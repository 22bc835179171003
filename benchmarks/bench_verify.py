"""Verified computation benchmark (issue 20 items 5-6): its cost, and how fast it finds a lying node.

On a local swarm of real ``biopetals-node`` processes on 127.0.0.1 (a random Llama, blocks 0:8,
each node serving all of them; tests/support_swarm.py):

1. **cost**: two honest nodes (one to route through, one replica). Greedy generation of
   ``--tokens`` tokens after a 16-token prompt at ``verify`` = 0, 0.05 and 1.0, tokens/s of the
   whole ``generate()`` (prefill included), each rate ``--repeats`` times (median), next to local
   transformers on the same checkpoint in the same run; with the checks made and the largest
   relative error two agreeing nodes showed against the tolerance (client/verification.py).
2. **detection**: a third node announcing 10^9 tokens/s (routes choose it) corrupts its inference
   steps (tests/broken_node.py ``corrupt``), 100 % of them, then (restarted) 10 %. For each liar and
   each rate 0.05 and 1.0, ``--runs`` fresh clients generate ``--tokens`` tokens each: the fraction of
   runs in which the liar was found (arbitrated by the other honest node and avoided), the median
   number of steps until it was (the prefill is step 1), and whether the tokens equal transformers'.
3. **tolerance constants** (spec/tensors.md §10), without nodes: transformers' own Llama blocks, a
   one-token step from the KV cache against the whole sequence at once, per compute dtype and width:
   the worst relative L2 error and ``err / (u sqrt(L))``, the constant ``COMPUTE_FACTOR`` must exceed.

    .venv/bin/python benchmarks/bench_verify.py                 # default: 24 tokens, 3 repeats, 5 runs
    .venv/bin/python benchmarks/bench_verify.py --tokens 12 --runs 3 --hidden 64
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from biopetals.protocol.program_env import apply_program_environment  # noqa: E402

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import torch  # noqa: E402
import support_swarm  # noqa: E402
from support_models import make_tiny_checkpoint  # noqa: E402
from support_swarm import Swarm  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from biopetals.client import AutoDistributedModelForCausalLM  # noqa: E402
from biopetals.client.verification import tolerance  # noqa: E402

PROMPT = 16
RATES = (0.0, 0.05, 1.0)
BROKEN_NODE = [sys.executable, str(Path(__file__).resolve().parents[1] / "tests" / "broken_node.py")]


def client(checkpoint: Path, swarm: Swarm, codec: str, rate: float, seed: int):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec=codec, verify=rate,
        seed=seed, step_timeout=60.0)


def generate(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return out, time.perf_counter() - t0


def cost(checkpoint: Path, swarm: Swarm, ids, tokens: int, repeats: int, codec: str, reference) -> list[str]:
    rows = []
    _, local = generate(reference, ids, tokens)
    rows.append(f"| local transformers | {tokens / local:.1f} | | | |")
    for rate in RATES:
        model = client(checkpoint, swarm, codec, rate, seed=1)
        try:
            generate(model, ids, 2)  # warm-up: connections, routes
            times = [generate(model, ids, tokens)[1] for _ in range(repeats)]
            v = model.swarm.verifier
            tol = tolerance(codec, ["float32"], 8)
            rows.append(f"| verify={rate:g} | {tokens / statistics.median(times):.1f} | {v.checks} | "
                        f"{v.worst_agreement:.2e} | {tol:.2e} |")
        finally:
            model.close()
    return rows


def detection(checkpoint: Path, swarm: Swarm, liar, ids, tokens: int, runs: int, codec: str, expected,
              corrupt: str) -> list[str]:
    rows = []
    for rate in RATES[1:]:
        found, steps, equal = 0, [], 0
        for run in range(runs):
            model = client(checkpoint, swarm, codec, rate, seed=100 + run)
            try:
                out, _ = generate(model, ids, tokens)
                evidence = model.swarm.verifier.liars.get(liar.peer_id)
            finally:
                model.close()
            equal += bool(torch.equal(out, expected))
            if evidence is not None:
                found += 1
                steps.append(evidence.positions[0] - PROMPT + 2 if evidence.positions[0] >= PROMPT else 1)
        median = f"{statistics.median(steps):g}" if steps else "-"
        rows.append(f"| {corrupt} | {rate:g} | {found}/{runs} | {median} | {sorted(steps)} | {equal}/{runs} |")
    return rows


def constants() -> list[str]:
    from support_models import make_config
    from transformers import LlamaForCausalLM

    from biopetals.client.verification import COMPUTE_FACTOR, unit_roundoff

    rows = []
    for hidden in (64, 256):
        torch.manual_seed(0)
        base = LlamaForCausalLM(make_config(hidden_size=hidden, intermediate_size=4 * hidden, vocab_size=512)).eval()
        layers = base.config.num_hidden_layers - 1  # hidden_states[-2]: after all but the last block (no norm)
        for dtype in ("float32", "float16", "bfloat16"):
            model = base.to(getattr(torch, dtype)).model
            worst = 0.0
            for seed in range(3):
                x = torch.randn(1, 40, hidden, generator=torch.Generator().manual_seed(seed)).to(model.dtype)
                with torch.no_grad():
                    full = model(inputs_embeds=x, output_hidden_states=True).hidden_states[-2]
                    cache = model(inputs_embeds=x[:, :16], use_cache=True).past_key_values
                    for t in range(16, 40):
                        step = model(inputs_embeds=x[:, t:t + 1], past_key_values=cache, use_cache=True,
                                     output_hidden_states=True)
                        cache = step.past_key_values
                        a, b = step.hidden_states[-2][0, -1].double(), full[0, t].double()
                        worst = max(worst, float((a - b).norm() / b.norm()))
            constant = worst / (unit_roundoff(dtype) * layers ** 0.5)
            rows.append(f"| {hidden} | {dtype} | {layers} | {worst:.2e} | {constant:.2f} | {COMPUTE_FACTOR[dtype]:g} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=24, help="new tokens per generate (default 24)")
    p.add_argument("--repeats", type=int, default=3, help="generates per rate in the cost table (default 3)")
    p.add_argument("--runs", type=int, default=5, help="fresh clients per liar and rate (default 5)")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama (default 256)")
    p.add_argument("--codec", default="f32", choices=["f32", "f16"], help="activations on the wire (default f32)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    constant_rows = constants()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(Path(tmp) / "llama", hidden_size=args.hidden,
                                          intermediate_size=4 * args.hidden, vocab_size=2048)
        reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        ids = torch.randint(4, 2048, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        expected = reference.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        with Swarm(Path(tmp)) as swarm:
            for _ in range(2):
                swarm.start_node(checkpoint, "0:8", "--no-benchmark")
            cost_rows = cost(checkpoint, swarm, ids, args.tokens, args.repeats, args.codec, reference)
            support_swarm.NODE_COMMAND = BROKEN_NODE
            detect_rows = []
            for corrupt in ("1.0", "0.1"):
                liar = swarm.start_node(checkpoint, "0:8", env={"BIOPETALS_BROKEN": "corrupt,fast-liar",
                                                                "BIOPETALS_CORRUPT_RATE": corrupt,
                                                                "BIOPETALS_CORRUPT_SEED": "20"})
                detect_rows += detection(checkpoint, swarm, liar, ids, args.tokens, args.runs, args.codec, expected,
                                         f"{float(corrupt):.0%}")
                liar.stop()
    print(f"Random Llama, hidden {args.hidden}, 8 blocks, nodes on 127.0.0.1 each serving 0:8, codec {args.codec}, "
          f"{PROMPT}-token prompt + {args.tokens} greedy tokens; this machine's CPUs shared by client and nodes.\n")
    print("| client | tokens/s (median) | outputs checked | worst agreeing error | tolerance |")
    print("|---|---|---|---|---|")
    print("\n".join(cost_rows))
    print(f"\nDetection: {args.runs} fresh clients per row, each generating {args.tokens} tokens through a liar "
          "that wins every route; 2 honest nodes (replica and arbiter).\n")
    print("| liar corrupts | verify | runs it was found | median steps to detection | steps | tokens = transformers' |")
    print("|---|---|---|---|---|---|")
    print("\n".join(detect_rows))
    print("\nTolerance constants: a cached one-token step against the whole 40-token sequence, positions 16-39, "
          "3 random inputs, transformers' Llama blocks.\n")
    print("| hidden | dtype | blocks | worst relative error | err / (u sqrt(L)) | COMPUTE_FACTOR |")
    print("|---|---|---|---|---|---|")
    print("\n".join(constant_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
