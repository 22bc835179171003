"""Prompt-tune the bundled SmolLM2-135M-Instruct over a private 3-node swarm on this machine.

    python examples/finetune.py [--steps 30] [--mode deep_ptune] [--out biomed_prompts.pt]

What it does:

1. starts 3 ``biopetals-node`` processes on 127.0.0.1 splitting SmolLM2's 30 blocks
   (converted once from the bundled GGUF, as the demo does);
2. loads the client with trainable prompts (``tuning_mode``, ``pre_seq_len``): only
   the prompts train, the model's weights stay as they are, on the nodes and here;
3. reads ``examples/data/biomed_qa.tsv`` (biomedical questions and short answers
   written for this repository, CC0-1.0), holds out every 5th pair for evaluation;
4. evaluates the held-out answers (loss and token accuracy: the answer's tokens
   predicted from the question), trains with AdamW over the swarm (loss per step,
   progress bar), evaluates again and shows a few greedy answers before and after;
5. saves the trained prompts (``model.prompt_state()``, a small torch file); load
   them later with ``model.load_prompt_state(torch.load(path))``.

Loss is computed on the answer tokens only (the question and padding are labelled -100).
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import random
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "biomed_qa.tsv"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python examples/finetune.py",
        description="Prompt-tune SmolLM2-135M-Instruct on biomedical Q/A over a local 3-node BioPetals swarm.")
    p.add_argument("--mode", choices=["ptune", "deep_ptune"], default="deep_ptune",
                   help="prompts in front of the input only (ptune) or also before every block (deep_ptune, default)")
    p.add_argument("--pre-seq-len", type=int, default=16, help="trainable prompt positions (default 16)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--batch-size", type=int, default=8, help="Q/A pairs per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    p.add_argument("--nodes", type=int, default=3, help="node processes splitting the blocks (default 3)")
    p.add_argument("--codec", choices=["f16", "f32", "bf16"], default="f16",
                   help="activations and gradients on the wire (default f16; f32 is lossless)")
    p.add_argument("--data", type=Path, default=DATA, help="question<TAB>answer file (default: the bundled set)")
    p.add_argument("--out", type=Path, default=Path("biomed_prompts.pt"), help="where to save the trained prompts")
    p.add_argument("--model", default=None, help="a checkpoint directory to use instead of the bundled SmolLM2")
    p.add_argument("--show", type=int, default=3,
                   help="held-out questions answered (greedy) before and after training (default 3; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="random seed: prompt init and batch order (default 0)")
    return p


def load_pairs(path: Path) -> list[tuple[str, str]]:
    """``question<TAB>answer`` lines; ``#`` comments and blank lines skipped."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise ValueError(f"{path}:{n}: expected question<TAB>answer")
        pairs.append((parts[0].strip(), parts[1].strip()))
    return pairs


class Encoder:
    """Q/A pairs as the model's chat: ``input_ids``, ``attention_mask`` (right padding) and answer-only labels."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.end = tok.eos_token or ""

    def question(self, q: str) -> list[int]:
        if self.tok.chat_template:
            text = self.tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=False)
        else:  # a base model's tokenizer (or a test's): plain text
            text = f"Question: {q}\nAnswer: "
        return self.tok(text, add_special_tokens=False).input_ids

    def batch(self, pairs: list[tuple[str, str]]):
        import torch

        rows = []
        for q, a in pairs:
            prompt = self.question(q)
            answer = self.tok(a + self.end, add_special_tokens=False).input_ids
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        ids = torch.full((len(rows), width), pad)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return ids, mask, labels


def evaluate(model, enc: Encoder, pairs, batch_size: int) -> tuple[float, float]:
    """Mean loss and token accuracy over the answer tokens of ``pairs``."""
    import torch

    total, correct, nll = 0, 0, 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            ids, mask, labels = enc.batch(pairs[i:i + batch_size])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            keep = target != -100
            nll += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
            total += int(keep.sum())
    return nll / total, correct / total


def greedy_answer(model, enc: Encoder, question: str, max_tokens: int = 24) -> str:
    """Greedy decoding with KV caches on the nodes; the session's first step carries the prompts."""
    import torch

    ids = torch.tensor([enc.question(question)])
    answer: list[int] = []
    with model.inference_session(max_length=ids.shape[1] + model.tuning.pre_seq_len + max_tokens) as session:
        new = ids
        for _ in range(max_tokens):
            nxt = int(model.inference_step(session, new)[0, -1].argmax())
            if nxt == enc.tok.eos_token_id:
                break
            answer.append(nxt)
            new = torch.tensor([[nxt]])
    return enc.tok.decode(answer, skip_special_tokens=True).strip()


def show(model, enc: Encoder, pairs, batch_size: int, when: str, answers: int) -> float:
    loss, acc = evaluate(model, enc, pairs, batch_size)
    print(f"\n{when}: held-out answer loss {loss:.3f}, token accuracy {acc:.1%} ({len(pairs)} questions)")
    for q, a in pairs[:answers]:
        print(f"  Q: {q}\n     expected: {a}\n     model:    {greedy_answer(model, enc, q)}")
    return loss


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.nodes < 1 or args.steps < 1 or args.batch_size < 1:
        print("--nodes, --steps and --batch-size must be at least 1", file=sys.stderr)
        return 2
    pairs = load_pairs(args.data)
    held_out, train = pairs[::5], [p for i, p in enumerate(pairs) if i % 5]
    print(f"{len(pairs)} Q/A pairs from {args.data.name}: {len(train)} to train on, {len(held_out)} held out")

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from biopetals.client import AutoDistributedModelForCausalLM
    from biopetals.client.demo import _spans
    from biopetals.client.local_swarm import LocalSwarm
    from biopetals.models.config import load_config

    if args.model is None:
        from biopetals.models.smollm2 import smollm2_path

        print("Preparing the bundled SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
        path = smollm2_path()
    else:
        path = args.model
    n_blocks = int(load_config(path)[0].num_hidden_layers)
    spans = _spans(n_blocks, min(args.nodes, n_blocks))
    print(f"Starting {len(spans)} nodes on 127.0.0.1: blocks " + ", ".join(f"{a}:{b}" for a, b in spans), flush=True)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    try:
        with LocalSwarm(path, spans) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec=args.codec,
                tuning_mode=args.mode, pre_seq_len=args.pre_seq_len)
            with model:
                enc = Encoder(AutoTokenizer.from_pretrained(path))
                trainable = [p for p in model.parameters() if p.requires_grad]
                print(f"Training {sum(p.numel() for p in trainable):,} prompt parameters ({args.mode}, "
                      f"{args.pre_seq_len} positions); the model's weights stay frozen.")
                before = show(model, enc, held_out, args.batch_size, "Before training", args.show)
                opt = torch.optim.AdamW(trainable, lr=args.lr)
                t0 = time.monotonic()
                bar = tqdm(range(1, args.steps + 1), desc="prompt tuning", unit="step")
                for step in bar:
                    ids, mask, labels = enc.batch(rng.sample(train, min(args.batch_size, len(train))))
                    opt.zero_grad()
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    opt.step()
                    bar.set_postfix(loss=f"{loss.item():.3f}")
                    tqdm.write(f"step {step:3d}: loss {loss.item():.4f}")
                elapsed = time.monotonic() - t0
                print(f"{args.steps} steps in {elapsed:.1f} s ({args.steps / elapsed:.2f} steps/s, "
                      f"forward + backward through {len(spans)} nodes)")
                after = show(model, enc, held_out, args.batch_size, "After training", args.show)
                torch.save(model.prompt_state(), args.out)
                print(f"\nHeld-out loss {before:.3f} -> {after:.3f}. Trained prompts saved to {args.out}")
    except KeyboardInterrupt:
        print("\nInterrupted: nodes stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
