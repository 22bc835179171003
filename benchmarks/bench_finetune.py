"""Fine-tuning benchmark: prompt-tuning steps/s over 1, 2, 3 loopback nodes vs local transformers.

One training step = forward of a batch of 8 sequences x 128 tokens with labels, the loss's
``backward()`` and an AdamW step on the trainable prompts (``tuning_mode="ptune"``,
``pre_seq_len=16``: the blocks see 16 + 128 positions). The model's weights are frozen
on both sides, as in prompt tuning; gradients still flow through every block to reach
the prompts.

* local: transformers' ``AutoModelForCausalLM`` of the same checkpoint, the prompts put
  in front of ``inputs_embeds``, in this process;
* distributed: ``AutoDistributedModelForCausalLM`` with ``tuning_mode="ptune"`` and
  ``biopetals-node`` processes on 127.0.0.1 splitting the blocks evenly; each step is a
  ``Forward`` per node and a ``Backward`` per node in reverse (which recomputes the
  node's forward: nodes keep no activations between calls, spec/messages.md §6).

Everything shares this machine's cores. Model: the bundled SmolLM2-135M-Instruct
(``--model DIR`` for another checkpoint). Prints a markdown table.

    .venv/bin/python benchmarks/bench_finetune.py [--steps 3] [--nodes 1 2 3] [--codec f16]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import torch  # noqa: E402

from biopetals.client import AutoDistributedModelForCausalLM  # noqa: E402
from biopetals.client.demo import _spans  # noqa: E402
from biopetals.client.local_swarm import LocalSwarm  # noqa: E402
from biopetals.models.config import load_config  # noqa: E402

BATCH, SEQ, PRE_SEQ_LEN = 8, 128, 16


def _batch(vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def timed_steps(step, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``step()``, after one warm-up call."""
    step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def local_seconds(path: Path, ids: torch.Tensor, steps: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    prompts = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, model.config.hidden_size) * 0.02)
    opt = torch.optim.AdamW([prompts], lr=1e-2)

    def step() -> None:
        opt.zero_grad()
        embeds = torch.cat([prompts.expand(BATCH, -1, -1), model.model.embed_tokens(ids)], dim=1)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state[:, PRE_SEQ_LEN:]  # as the client: head on T only
        logits = model.lm_head(hidden)
        model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size).backward()
        opt.step()

    try:
        return timed_steps(step, steps)
    finally:
        del model
        gc.collect()


def swarm_seconds(path: Path, ids: torch.Tensor, steps: int, n_nodes: int, codec: str) -> float:
    n_blocks = int(load_config(path)[0].num_hidden_layers)
    with LocalSwarm(path, _spans(n_blocks, n_nodes)) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec=codec,
            tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN)
        with model:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

            def step() -> None:
                opt.zero_grad()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()

            return timed_steps(step, steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per setup, after one warm-up (median; default 3)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3], help="node counts to run (default 1 2 3)")
    p.add_argument("--codec", choices=["f16", "f32", "bf16"], default="f16",
                   help="activations and gradients on the wire (default f16)")
    p.add_argument("--model", type=Path, default=None, help="a checkpoint directory (default: the bundled SmolLM2)")
    args = p.parse_args(argv)
    if args.model is None:
        from biopetals.models.smollm2 import smollm2_path

        path, name = Path(smollm2_path()), "SmolLM2-135M"
    else:
        path, name = args.model, args.model.name
    ids = _batch(int(load_config(path)[0].vocab_size))
    t0 = time.monotonic()
    rows = [("local transformers", local_seconds(path, ids, args.steps))]
    print(f"  local: {rows[0][1]:.2f} s/step", file=sys.stderr, flush=True)
    for n in args.nodes:
        rows.append((f"{n} node{'s' if n > 1 else ''}", swarm_seconds(path, ids, args.steps, n, args.codec)))
        print(f"  {rows[-1][0]}: {rows[-1][1]:.2f} s/step", file=sys.stderr, flush=True)
    local = rows[0][1]
    print(f"\n| model | setup | s/step | steps/s | tokens/s | vs local |\n|---|---|---:|---:|---:|---:|")
    for setup, sec in rows:
        print(f"| {name} | {setup} | {sec:.2f} | {1 / sec:.3f} | {BATCH * SEQ / sec:.0f} | {100 * local / sec:.0f}% |")
    print(f"\nptune, pre_seq_len {PRE_SEQ_LEN}, batch {BATCH} x {SEQ} tokens, fp32 compute, {args.codec} on the wire, "
          f"{torch.get_num_threads()} torch threads per process, median of {args.steps} steps after a warm-up; "
          f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
