"""WAN benchmark (issue 23 item 4): tokens/s of plain, prompt-lookup and assisted greedy decoding over slow links.

Every node sits behind a relay on 127.0.0.1 (benchmarks/wan_relay.py) that adds a one-way
delay each way (RTT / 2) and caps each direction of each connection at ``--rate-mbit``
(default 100 Mbit/s); nodes announce the relay's address (``--announce``), so the client's
connections, the DHT and the node-to-node pushes all pass through relays. A decode step
then costs (hops + 1) one-way delays plus compute.

For each model (the bundled SmolLM2-135M-Instruct, a tiny random Llama with SmolLM2's
vocabulary), node count (2, 3) and RTT (0, 20, 100 ms; one swarm per model and node count,
the relays' delay changed in place), two tasks (copy-heavy: repeat a given passage; free: a
question) and three methods:

* ``plain``: ``generate(ids, do_sample=False)``;
* ``lookup``: ``generate(..., prompt_lookup_num_tokens=K)`` (drafts from the prompt);
* ``assistant``: ``generate(..., assistant_model=draft)``, the draft being the same model cut
  to its first ``--draft-fraction`` of layers, run locally (same tokenizer, no extra download;
  no smaller model shares SmolLM2's tokenizer here). Such a draft agrees poorly with the full
  model (measured locally on these prompts: 24 of 30 layers 25-34 %, 12 layers 3-6 %); a
  real deployment pairs a big swarm model with a small trained model of its family.

Columns: tokens/s over the whole ``generate`` call (prefill included, the same for every
method), speed-up against plain, target-model steps (calls through the swarm), acceptance
rate (accepted draft tokens / proposed), and whether the greedy output equals plain decoding
token for token. A method the client does not support prints ``n/a (not supported)``.

    .venv/bin/python benchmarks/bench_wan.py                      # full table
    .venv/bin/python benchmarks/bench_wan.py --quick              # SmolLM2, 2 nodes, 100 ms, fewer tokens
    .venv/bin/python benchmarks/bench_wan.py --rtt 100 --nodes 2 3 --models smollm2
"""

from __future__ import annotations

import argparse
import gc
import socket
import sys
import tempfile
import time
from pathlib import Path

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_link import MBIT  # noqa: E402
from wan_relay import RelayProcess  # noqa: E402

from biopetals.client import AutoDistributedModelForCausalLM  # noqa: E402
from biopetals.client.local_swarm import LocalSwarm  # noqa: E402

PASSAGE = ("The mitochondrion is an organelle found in the cells of most eukaryotes. Mitochondria use aerobic "
           "respiration to generate adenosine triphosphate, which is used throughout the cell as a source of "
           "chemical energy. They were discovered by Albert von Kolliker in 1857 in the voluntary muscles of insects.")
TASKS = {
    "copy": f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    "free": "Why is the sky blue? Answer in three sentences.",
}
METHODS = ("plain", "lookup", "assistant")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayedSwarm(LocalSwarm):
    """A LocalSwarm whose node ``i`` listens on ``node_ports[i]`` and announces ``127.0.0.1:relay_ports[i]``."""

    def __init__(self, model, spans, node_ports: list[int], relay_ports: list[int], **kwargs) -> None:
        self.node_ports, self.relay_ports = node_ports, relay_ports
        super().__init__(model, spans, **kwargs)

    def _command(self, start: int, end: int) -> list[str]:
        i = len(self.nodes)
        return super()._command(start, end) + [
            "--port", str(self.node_ports[i]), "--announce", f"/ip4/127.0.0.1/tcp/{self.relay_ports[i]}"]


def spans(n_blocks: int, n_nodes: int) -> list[tuple[int, int]]:
    b = [round(i * n_blocks / n_nodes) for i in range(n_nodes + 1)]
    return [(b[i], b[i + 1]) for i in range(n_nodes)]


def make_tiny(path: Path, source: Path) -> Path:
    """A tiny random Llama (8 layers, hidden 64) with SmolLM2's tokenizer and vocabulary, so both share prompts."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         initializer_range=0.05, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="2MB")
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_draft(path: Path, layers: int):
    """The model cut to its first ``layers`` layers (embeddings, final norm and head kept), run locally."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    draft.initial_assistant_tokens = draft.generation_config.num_assistant_tokens
    return draft


def prompt_ids(path: Path, text: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


class StepCounter:
    """Counts the model's forward calls and the tokens each takes in (for steps and the acceptance rate)."""

    def __init__(self, model) -> None:
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        self.lengths.append(int(ids.shape[1]))

    def acceptance(self, prompt: int, new_tokens: int) -> float | None:
        """Accepted / proposed draft tokens: the first call takes the prompt, every later one the last
        token; the rest are candidates, and each call yields its accepted candidates plus one token."""
        if not self.lengths:
            return None
        proposed = self.lengths[0] - prompt + sum(n - 1 for n in self.lengths[1:])
        accepted = new_tokens - len(self.lengths)
        return accepted / proposed if proposed > 0 else None


def run_method(model, ids: torch.Tensor, method: str, new_tokens: int, draft, lookup_k: int, pad: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                  attention_mask=torch.ones_like(ids))
    if method == "lookup":
        kwargs["prompt_lookup_num_tokens"] = lookup_k
    elif method == "assistant":
        # transformers' heuristic schedule carries the draft length across generate() calls: every
        # call starts from the draft's own setting, so rows do not depend on the ones before
        draft.generation_config.num_assistant_tokens = draft.initial_assistant_tokens
        kwargs["assistant_model"] = draft
    counter = StepCounter(model)
    try:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        elapsed = time.perf_counter() - t
    except (NotImplementedError, ValueError, TypeError) as e:
        return {"error": f"n/a (not supported: {type(e).__name__})", "detail": str(e)}
    finally:
        counter.handle.remove()
    tokens = out[0, ids.shape[1]:].tolist()
    return {"tokens": tokens, "tps": len(tokens) / elapsed, "steps": len(counter.lengths),
            "acceptance": counter.acceptance(ids.shape[1], len(tokens)) if method != "plain" else None}


def bench_model(name: str, path: Path, args: argparse.Namespace) -> list[dict]:
    from biopetals.models.config import load_config

    config, _ = load_config(path)
    n_blocks = int(config.num_hidden_layers)
    pad = int(config.pad_token_id if config.pad_token_id is not None else config.eos_token_id)
    draft = make_draft(path, max(1, round(args.draft_fraction * n_blocks)))
    prompts = {task: prompt_ids(path, TASKS[task]) for task in args.tasks}
    rows = []
    for n in args.nodes:
        node_ports = [free_port() for _ in range(n)]
        with RelayProcess(node_ports, delay=args.rtt[0] / 2000, rate=args.rate_mbit * MBIT) as relay, \
                RelayedSwarm(path, spans(n_blocks, n), node_ports, [relay.ports[p] for p in node_ports],
                             threads=args.threads) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                    swarm_key=swarm.key_path)
            try:
                for rtt in args.rtt:
                    relay.set_delay(rtt / 2000)
                    with torch.no_grad():  # warm-up: routes and connections at this delay
                        model.generate(prompts[args.tasks[0]], max_new_tokens=2, do_sample=False, pad_token_id=pad)
                    for task in args.tasks:
                        plain = None
                        for method in METHODS:
                            r = run_method(model, prompts[task], method, args.new_tokens, draft, args.lookup_k, pad)
                            r.update(model=name, nodes=n, rtt=rtt, task=task, method=method)
                            if method == "plain":
                                plain = r
                            elif "tokens" in r and plain is not None and "tokens" in plain:
                                r["same"] = r["tokens"] == plain["tokens"]
                                r["speedup"] = r["tps"] / plain["tps"]
                            rows.append(r)
                            print("  " + line(r) + (f" ({r['detail']})" if "detail" in r else ""),
                                  file=sys.stderr, flush=True)
            finally:
                model.close()
    del draft
    gc.collect()
    return rows


def line(r: dict) -> str:
    head = f"| {r['model']} | {r['nodes']} | {r['rtt']} | {r['task']} | {r['method']} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | |"
    acc = "—" if r.get("acceptance") is None else f"{100 * r['acceptance']:.0f}%"
    speed = "1.00x" if r["method"] == "plain" else f"{r.get('speedup', 0):.2f}x"
    same = "—" if r["method"] == "plain" else ("yes" if r.get("same") else "NO")
    return f"{head} {r['tps']:.1f} | {speed} | {r['steps']} | {acc} | {same} |"


def table(rows: list[dict]) -> str:
    out = ["| model | nodes | RTT ms | task | method | tokens/s | vs plain | steps | accepted | = plain |",
           "|---|---:|---:|---|---|---:|---:|---:|---:|---|"]
    return "\n".join(out + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="SmolLM2 only, 2 nodes, 100 ms RTT, 24 new tokens")
    p.add_argument("--rtt", type=float, nargs="+", default=None, metavar="MS", help="RTTs in ms (default 0 20 100)")
    p.add_argument("--nodes", type=int, nargs="+", default=None, metavar="N", help="node counts (default 2 3)")
    p.add_argument("--models", nargs="+", choices=["smollm2", "tiny"], default=None, help="default: both")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["copy", "free"])
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate per call (default 32; quick 24)")
    p.add_argument("--lookup-k", type=int, default=10, help="prompt_lookup_num_tokens (default 10)")
    p.add_argument("--draft-fraction", type=float, default=0.8,
                   help="the assistant: the model's first layers, this fraction of them, run locally (default 0.8)")
    p.add_argument("--rate-mbit", type=float, default=100.0, help="bandwidth per link and direction (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    args = p.parse_args(argv)
    args.rtt = [int(x) if float(x).is_integer() else x for x in (args.rtt or ([100] if args.quick else [0, 20, 100]))]
    args.nodes = args.nodes or ([2] if args.quick else [2, 3])
    args.models = args.models or (["smollm2"] if args.quick else ["smollm2", "tiny"])
    args.new_tokens = args.new_tokens or (24 if args.quick else 32)
    if any(r < 0 for r in args.rtt) or any(n < 1 for n in args.nodes) or args.new_tokens < 1:
        p.error("RTTs must be >= 0, node counts and --new-tokens >= 1")
    if not 0 < args.draft_fraction <= 1:
        p.error("--draft-fraction must be in (0, 1]")
    torch.set_num_threads(args.threads)
    from biopetals.models.smollm2 import smollm2_path

    t0 = time.monotonic()
    rows: list[dict] = []
    smollm2 = smollm2_path()
    with tempfile.TemporaryDirectory(prefix="bench-wan-") as tmp:
        for name in args.models:
            path = smollm2 if name == "smollm2" else make_tiny(Path(tmp) / "tiny", smollm2)
            rows += bench_model("SmolLM2-135M" if name == "smollm2" else "tiny Llama", path, args)
    print(f"\n{table(rows)}\n")
    print(f"relays: RTT/2 each way per link, {args.rate_mbit:g} Mbit/s per link and direction; {args.new_tokens} new "
          f"tokens, greedy; lookup K={args.lookup_k}; assistant = first {args.draft_fraction:g} of the layers, local; "
          f"{args.threads} torch thread(s) per process; total {time.monotonic() - t0:.0f} s")
    target = [r for r in rows if r["rtt"] == 100 and r["task"] == "copy" and r["method"] != "plain" and "tps" in r]
    if target:
        best = max(target, key=lambda r: r.get("speedup", 0))
        ok = best.get("speedup", 0) >= 2 and best.get("same")
        print(f"target: at 100 ms RTT, >= 2x plain tokens/s on the copy task with identical greedy output: best "
              f"{best['method']} {best['model']} {best['nodes']} nodes {best.get('speedup', 0):.2f}x, "
              f"{'same' if best.get('same') else 'DIFFERENT'} output -> {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
