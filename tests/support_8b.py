"""Helpers for the Llama-3-8B-shaped swarm (issue 22 items 4-5): its checkpoint, a span-by-span
transformers reference, and node memory.

* ``make_8b_checkpoint(dir, layers, vocab)``: scripts/make_llama3_8b.py's ``write_checkpoint``
  (Llama-3-8B's exact config, random bf16 weights, written shard by shard); ``layers=2,
  vocab=2048`` is the scaled-down copy of the default suite (~0.9 GB on disk);
* ``ReferenceSpan.load(dir, start, end)``: transformers' own ``LlamaModel`` holding only blocks
  ``[start, end)`` (renumbered 0..n-1, final norm replaced by the identity), its weights read
  straight from the shards in bf16: on the CPU they stay backed by the mapped files, so a span
  costs no memory beyond the page cache the nodes already use. It never imports BioPetals'
  block code: ``LlamaModel.forward`` builds its own rotary embeddings and causal mask;
* ``reference_logits(dir, spans, ids)``: embeddings, every span one at a time, final norm and LM
  head (a full 8B model in bf16 does not fit beside 4 nodes in 24 GiB; one span at a time does);
* ``proc_memory(pid)``: VmHWM / VmRSS / RssFile / RssAnon of a process, in bytes (Linux /proc).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, LlamaModel

from biopetals.models.transformers_contract import cache_keyword_of

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "make_llama3_8b.py"


def generator_module():
    """scripts/make_llama3_8b.py as a module (scripts/ is not a package)."""
    if "make_llama3_8b" not in sys.modules:
        spec = importlib.util.spec_from_file_location("make_llama3_8b", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["make_llama3_8b"] = module
        spec.loader.exec_module(module)
    return sys.modules["make_llama3_8b"]


def make_8b_checkpoint(path: str | Path, layers: int = 2, vocab: int = 2048, *, seed: int = 0,
                       max_shard_bytes: int | None = None) -> Path:
    gen = generator_module()
    return gen.write_checkpoint(path, num_layers=layers, vocab_size=vocab, seed=seed,
                                max_shard_bytes=max_shard_bytes or gen.MAX_SHARD_BYTES)


def read_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """``names`` from the checkpoint's shards (through its index), as stored (bf16), mapped not copied."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in names}):
        with safe_open(directory / shard, "pt") as f:
            for n in names:
                if weight_map[n] == shard:
                    out[n] = f.get_tensor(n)
    return out


class ReferenceSpan:
    """transformers' LlamaModel with only blocks [start, end) of the checkpoint at ``directory``."""

    def __init__(self, model: LlamaModel, start: int, end: int) -> None:
        self.model, self.start, self.end = model, start, end

    @classmethod
    def load(cls, directory: str | Path, start: int, end: int, dtype: torch.dtype = torch.bfloat16) -> "ReferenceSpan":
        directory = Path(directory)
        config = copy.deepcopy(AutoConfig.from_pretrained(directory))
        config.num_hidden_layers = end - start
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            model = LlamaModel(config)
        model.embed_tokens = None  # the span starts from hidden states
        model.norm = nn.Identity()  # and ends with the last block's output (the client norms)
        wanted = {f"model.layers.{i}.": f"layers.{i - start}." for i in range(start, end)}
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        names = [n for n in index if any(n.startswith(p) for p in wanted)]
        state = {}
        for name, tensor in read_tensors(directory, names).items():
            prefix = next(p for p in wanted if name.startswith(p))
            state[wanted[prefix] + name[len(prefix):]] = tensor.to(dtype)
        model.load_state_dict(state, strict=False, assign=True)  # embed_tokens / norm are gone
        model.rotary_emb = type(model.rotary_emb)(config=config)  # its buffers off the meta device
        model.requires_grad_(False)
        return cls(model.eval(), start, end)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The span's output for hidden states ``[B, T, 4096]`` at positions 0..T-1 (differentiable)."""
        return self.model(inputs_embeds=hidden.to(self.model.dtype), use_cache=False).last_hidden_state

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def step(self, hidden: torch.Tensor, cache) -> torch.Tensor:
        """Inference: the next tokens' outputs, appending their keys and values to ``cache`` (``new_cache()``)."""
        keyword = cache_keyword_of(type(self.model).forward)  # `cache` since transformers 5.24, before `past_key_values`
        with torch.no_grad():
            return self.model(inputs_embeds=hidden.to(self.model.dtype), use_cache=True,
                              **{keyword: cache}).last_hidden_state


def client_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    return read_tensors(Path(directory), ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])


def reference_logits(directory: str | Path, spans: list[tuple[str | Path, int, int]], ids: torch.Tensor,
                     embed: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of transformers' decoder layers over ``spans`` ``(directory holding them, start, end)``,
    covering every block, one span loaded at a time, with the embeddings (``embed``: a tensor to use
    instead, e.g. one that requires grad), final RMS norm and LM head of the checkpoint at ``directory``;
    bf16 as the nodes and the client. Differentiable (call under ``no_grad`` when only values matter)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = AutoConfig.from_pretrained(directory)
    parts = client_tensors(directory)
    hidden = nn.functional.embedding(ids, parts["model.embed_tokens.weight"] if embed is None else embed)
    for where, start, end in spans:
        hidden = ReferenceSpan.load(where, start, end)(hidden)
    norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(parts["model.norm.weight"])
    return nn.functional.linear(norm(hidden), parts["lm_head.weight"])


def proc_memory(pid: int) -> dict[str, int]:
    """VmHWM (peak resident), VmRSS, RssAnon, RssFile of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def block_bytes(directory: str | Path) -> int:
    """Bytes on disk of one decoder block (every block has the same size)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    specs = generator_module().tensor_specs(config)
    return sum(s.nbytes for s in specs if s.name.startswith("model.layers.0."))
