"""Write a random checkpoint with Llama-3-8B's exact configuration, shard by shard, never the whole model.

Issue 22 (item 4): the mission's model at its own size without downloading it. The
directory looks like ``meta-llama/Meta-Llama-3-8B``'s: the same ``config.json`` (32
layers, hidden 4096, intermediate 14336, 32 query / 8 key-value heads, vocab 128256,
rope_theta 500000, no rope scaling, bf16), a ``generation_config.json``, and the weights
in bf16 as ``model-0000X-of-0000N.safetensors`` shards of at most 5 GB (decimal, as
``save_pretrained(max_shard_size="5GB")`` cut the real one: 4 shards, 16.06 GB) with
``model.safetensors.index.json``. No tokenizer (the real one is 128256 tokens; callers
pass token ids).

Memory: each shard's safetensors header is computed from the shapes first, then every
tensor is generated and written on its own, in slices of ``SLICE_ELEMENTS`` elements
(~64 MiB of bf16), so the process never holds more than one slice (peak RSS ~0.5 GB,
torch included) whatever the model's size.

Weights: like transformers' ``_init_weights`` for Llama (normal, std ``initializer_range``
= 0.02; RMS norm weights 1), seeded per tensor from ``--seed`` and the tensor's name, so a
tensor's values do not depend on the other tensors: the scaled-down copy
(``--layers 2 --vocab 4096``) holds exactly the first two blocks of the full checkpoint.
A smaller vocabulary keeps Llama-3's layout of the special tokens (the last 256 ids;
``bos``/``eos`` are the first two of them).

    python scripts/make_llama3_8b.py /work/big/llama3-8b-random            # 16.06 GB, ~2-4 min
    python scripts/make_llama3_8b.py /tmp/llama3-8b-2l --layers 2 --vocab 4096   # scaled-down, 0.9 GB
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["llama3_8b_config", "tensor_specs", "write_checkpoint", "TensorSpec", "FULL_LAYERS", "FULL_VOCAB"]

FULL_LAYERS = 32
FULL_VOCAB = 128256
SPECIAL_TOKENS = 256  # Llama-3: ids 128000..128255; bos 128000, eos 128001
MAX_SHARD_BYTES = 5_000_000_000  # save_pretrained's "5GB" (decimal), which cut Meta-Llama-3-8B into 4 shards
SLICE_ELEMENTS = 32 * 1024 * 1024  # generated and written at once: 64 MiB of bf16
INDEX_FILE = "model.safetensors.index.json"


def llama3_8b_config(num_layers: int = FULL_LAYERS, vocab_size: int = FULL_VOCAB) -> dict:
    """``config.json`` of meta-llama/Meta-Llama-3-8B (with ``num_layers`` / ``vocab_size`` replaced)."""
    if not 1 <= num_layers <= FULL_LAYERS:
        raise ValueError(f"num_layers {num_layers}: need 1..{FULL_LAYERS}")
    if not 2 * SPECIAL_TOKENS <= vocab_size <= FULL_VOCAB:
        raise ValueError(f"vocab_size {vocab_size}: need {2 * SPECIAL_TOKENS}..{FULL_VOCAB}")
    bos = vocab_size - SPECIAL_TOKENS  # 128000 at the full size
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": bos + 1,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    std: float  # 0: all ones (RMS norm weights)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return 2 * self.numel  # bf16


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every tensor of the checkpoint in ``state_dict`` order (the order save_pretrained shards in)."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * d
    std = float(config["initializer_range"])
    out = [TensorSpec("model.embed_tokens.weight", (v, h), std)]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            TensorSpec(p + "self_attn.q_proj.weight", (h, h), std),
            TensorSpec(p + "self_attn.k_proj.weight", (kv, h), std),
            TensorSpec(p + "self_attn.v_proj.weight", (kv, h), std),
            TensorSpec(p + "self_attn.o_proj.weight", (h, h), std),
            TensorSpec(p + "mlp.gate_proj.weight", (i, h), std),
            TensorSpec(p + "mlp.up_proj.weight", (i, h), std),
            TensorSpec(p + "mlp.down_proj.weight", (h, i), std),
            TensorSpec(p + "input_layernorm.weight", (h,), 0.0),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), 0.0),
        ]
    out += [TensorSpec("model.norm.weight", (h,), 0.0), TensorSpec("lm_head.weight", (v, h), std)]
    return out


def shard_plan(specs: list[TensorSpec], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: list[TensorSpec]) -> bytes:
    """Length prefix + JSON header of a safetensors file holding ``shard`` in name order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in sorted(shard, key=lambda s: s.name):
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _write_tensor(f, spec: TensorSpec, seed: int) -> None:
    """Generate ``spec``'s values slice by slice (bf16) and write their bytes."""
    if spec.std == 0.0:
        f.write(torch.ones(spec.shape, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
        return
    gen = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    row = spec.numel // spec.shape[0]
    rows = max(1, SLICE_ELEMENTS // row)
    buf = torch.empty(rows, row, dtype=torch.bfloat16)
    for start in range(0, spec.shape[0], rows):
        part = buf[: min(rows, spec.shape[0] - start)]
        part.normal_(0.0, spec.std, generator=gen)
        f.write(memoryview(part.view(torch.uint8).numpy()))


def write_checkpoint(path: str | os.PathLike, *, num_layers: int = FULL_LAYERS, vocab_size: int = FULL_VOCAB,
                     seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = False) -> Path:
    """Write the checkpoint into the new (or empty) directory ``path``; return it."""
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty")
    config = llama3_8b_config(num_layers, vocab_size)
    specs = tensor_specs(config)
    shards = shard_plan(specs, max_shard_bytes)
    path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = sum(s.nbytes for s in specs)
    done, started = 0, time.monotonic()
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tmp = path / (name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(_header(shard))
            for spec in sorted(shard, key=lambda s: s.name):
                _write_tensor(f, spec, seed)
                weight_map[spec.name] = name
                done += spec.nbytes
                if progress:
                    print(f"\r{done / 1e9:6.2f} / {total / 1e9:.2f} GB  {name}", end="", file=sys.stderr, flush=True)
        os.replace(tmp, path / name)
    if progress:
        print(f"\n{total / 1e9:.2f} GB in {len(shards)} shards, {time.monotonic() - started:.0f} s", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": {s.name: weight_map[s.name] for s in specs}}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "transformers_version": "4.40.0.dev0"}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="The directory must not exist or be empty. Full size: 16.06 GB on disk.")
    p.add_argument("out", help="the checkpoint directory to write")
    p.add_argument("--layers", type=int, default=FULL_LAYERS, help=f"decoder layers (default {FULL_LAYERS}, as the real one)")
    p.add_argument("--vocab", type=int, default=FULL_VOCAB,
                   help=f"vocabulary size, {2 * SPECIAL_TOKENS}..{FULL_VOCAB} (default {FULL_VOCAB}, as the real one)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); each tensor is seeded from it and its name")
    p.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1e9,
                   help="largest shard in GB, decimal (default 5, as the real one)")
    args = p.parse_args(argv)
    try:
        write_checkpoint(args.out, num_layers=args.layers, vocab_size=args.vocab, seed=args.seed,
                         max_shard_bytes=int(args.max_shard_gb * 1e9), progress=True)
    except (ValueError, FileExistsError) as exc:
        p.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
