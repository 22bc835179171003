"""The BioPetals demo: a private 3-node swarm on this machine answers a biology question.

    python -m biopetals.client.demo [--max-new-tokens 96] [--question "..."]

What it does:

1. converts the bundled SmolLM2-135M-Instruct to safetensors once (cached);
2. writes a fresh swarm key into a temporary directory and starts 3
   ``biopetals-node`` processes on 127.0.0.1 that split its 30 blocks
   (0:10, 10:20, 20:30), the first starting the swarm, the others joining it;
3. loads the client (embeddings, final norm, LM head only), finds a route through
   the DHT, and asks the question with the model's chat template, streaming the
   answer token by token;
4. prints tokens/s and which peer served which blocks;
5. checks the answer: with greedy decoding, its first ``--check-tokens`` tokens must
   equal local transformers' own greedy output on the same checkpoint (exit status 1
   if not), so a wrong answer never looks like a slow one; then stops the nodes
   (also on Ctrl-C).
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import logging
import sys
import time

DEFAULT_QUESTION = "What does the mitochondria do in a cell? Answer in two sentences."


def _spans(n_blocks: int, n_nodes: int) -> list[tuple[int, int]]:
    bounds = [round(i * n_blocks / n_nodes) for i in range(n_nodes + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n_nodes)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m biopetals.client.demo",
        description="Start a private swarm of nodes on loopback serving SmolLM2-135M-Instruct, "
        "and ask it a biology question through the BioPetals client.",
    )
    p.add_argument("--question", default=DEFAULT_QUESTION, help="what to ask (default: a question about mitochondria)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="most tokens to generate (default 96)")
    p.add_argument("--nodes", type=int, default=3, help="node processes splitting the blocks (default 3)")
    p.add_argument("--sample", action="store_true", help="sample (temperature/top-p) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature with --sample (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling with --sample (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --sample (default 0)")
    p.add_argument("--codec", choices=["f16", "f32", "bf16"], default="f16",
                   help="activation codec on the wire (default f16; f32 is lossless)")
    p.add_argument("--check-tokens", type=int, default=16,
                   help="compare the first N greedy tokens with local transformers on the same checkpoint "
                   "(default 16; 0 skips the check; not done with --sample)")
    p.add_argument("--model", default=None, help="a checkpoint directory to use instead of the bundled SmolLM2")
    p.add_argument("-v", "--verbose", action="store_true", help="log routing and failover decisions")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.nodes < 1:
        print("--nodes must be at least 1", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer, TextStreamer

    from biopetals.client import AutoDistributedModelForCausalLM
    from biopetals.client.local_swarm import LocalSwarm
    from biopetals.models.config import load_config

    if args.model is None:
        from biopetals.models.smollm2 import smollm2_path

        print("Preparing the bundled SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
        path = smollm2_path()
    else:
        path = args.model
    config, _ = load_config(path)
    n_blocks = int(config.num_hidden_layers)
    spans = _spans(n_blocks, min(args.nodes, n_blocks))
    print(f"Starting {len(spans)} nodes on 127.0.0.1 with a fresh swarm key: blocks "
          + ", ".join(f"{a}:{b}" for a, b in spans), flush=True)
    t0 = time.monotonic()
    try:
        with LocalSwarm(path, spans) as swarm:
            for node in swarm.nodes:
                print(f"  node {node.start}:{node.end}  {node.addr}")
            print(f"Swarm ready in {time.monotonic() - t0:.1f} s. Loading the client ...", flush=True)
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec=args.codec)
            try:
                mib = model.client_nbytes() / 2**20
                print(f"Client holds embeddings, final norm and LM head only: {mib:.1f} MiB "
                      f"(the {n_blocks} blocks are served by the nodes).")
                tok = AutoTokenizer.from_pretrained(path)
                messages = [{"role": "user", "content": args.question}]
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
                input_ids = ids["input_ids"]
                print(f"\nQ: {args.question}\nA: ", end="", flush=True)
                streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                kwargs = dict(max_new_tokens=args.max_new_tokens, streamer=streamer,
                              attention_mask=ids["attention_mask"], pad_token_id=tok.pad_token_id or tok.eos_token_id)
                if args.sample:
                    torch.manual_seed(args.seed)
                    kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
                else:
                    kwargs.update(do_sample=False)
                t = time.monotonic()
                out = model.generate(input_ids, **kwargs)
                elapsed = time.monotonic() - t
                new = out.shape[1] - input_ids.shape[1]
                print(f"\n{new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s "
                      f"(prompt of {input_ids.shape[1]} tokens included in the time)")
                print("Route taken:")
                for chain in model.last_route:
                    for peer, start, end in chain:
                        print(f"  blocks {start:>2}:{end:<2} served by {peer}")
            finally:
                model.close()
            print("Stopping the nodes ...", flush=True)
    except KeyboardInterrupt:
        print("\nInterrupted: nodes stopped.", file=sys.stderr)
        return 130
    if args.sample or args.check_tokens <= 0:
        return 0
    return 0 if check_against_transformers(path, ids, out, kwargs["pad_token_id"], args.check_tokens) else 1


def check_against_transformers(path, ids, out, pad_token_id: int, n_tokens: int) -> bool:
    """Greedy tokens of the swarm against transformers' own model run locally (fp32), first ``n_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM

    prompt = ids["input_ids"].shape[1]
    n = min(n_tokens, out.shape[1] - prompt)
    print(f"Checking the first {n} tokens against transformers' own model on this machine ...", flush=True)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = local.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)
    ours, theirs = out[0, prompt:prompt + n].tolist(), ref[0, prompt:prompt + n].tolist()
    if ours == theirs:
        print(f"Check passed: the first {n} tokens equal local transformers.")
        return True
    first = next(i for i, (a, b) in enumerate(zip(ours + [None] * n, theirs + [None] * n)) if a != b)
    print(f"CHECK FAILED: the swarm's answer differs from local transformers at token {first}: "
          f"swarm {ours}, local {theirs}", file=sys.stderr)
    return False


if __name__ == "__main__":
    sys.exit(main())
