"""Read individual tensors from a checkpoint's safetensors files, never whole shards.

``model.safetensors.index.json`` maps each tensor name to its shard; a checkpoint
without an index has a single ``model.safetensors``. Tensors are read one by one
with ``safe_open(...).get_tensor(name)``: safetensors maps the shard and gives back
only that tensor, so a node serving blocks 2..3 touches only their pages and never
materialises other blocks (measured in tests/test_models_memory.py).

On CPU, a tensor kept in the file's dtype stays backed by the mapped file (pages
are read on first use: "loading" 30 SmolLM2 blocks takes milliseconds, the first
forward pass reads them). Converting dtype or moving to a GPU copies. Replace
checkpoint files atomically (write elsewhere, rename), never in place, while
a node serves them.

``CheckpointIndex.reads`` records every tensor name read, so tests and the node's
start-up log can show exactly what was loaded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from biopetals.models.config import ArchSpec, ModelConfigError, load_config, check_architecture

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointIndex:
    """Tensor name -> shard file of one checkpoint directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reads: list[str] = []
        index_file = self.path / INDEX_FILE
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelConfigError(f"malformed {index_file}: {exc}") from exc
            self.weight_map: dict[str, str] = dict(weight_map)
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as f:
                self.weight_map = {name: SINGLE_FILE for name in f.keys()}
        else:
            raise ModelConfigError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")

    def names_with_prefix(self, prefix: str) -> list[str]:
        return sorted(name for name in self.weight_map if name.startswith(prefix))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, names: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly ``names``, opening each needed shard once."""
        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise ModelConfigError(f"tensor {name!r} not found in checkpoint {self.path}")
            by_shard[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, shard_names in by_shard.items():
            with safe_open(self.path / shard, framework="pt", device=str(device)) as f:
                for name in shard_names:
                    out[name] = f.get_tensor(name)
                    self.reads.append(name)
        return out


def _spec_and_index(path: str | Path, index: CheckpointIndex | None) -> tuple[ArchSpec, CheckpointIndex]:
    config, resolved = load_config(path)
    return check_architecture(config), index if index is not None else CheckpointIndex(resolved)


def load_block_state(
    path: str | Path, i: int, *, index: CheckpointIndex | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of block ``i`` with the ``model.layers.{i}.`` prefix stripped."""
    spec, index = _spec_and_index(path, index)
    prefix = f"{spec.layer_prefix}{i}."
    names = index.names_with_prefix(prefix)
    if not names:
        raise ModelConfigError(f"checkpoint {index.path} has no tensors for block {i} ({prefix}*)")
    return {name[len(prefix):]: t for name, t in index.read(names, device).items()}


def load_client_parts(
    path: str | Path, *, index: CheckpointIndex | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """``{"embed_tokens", "norm", "lm_head"}`` weights; with tied embeddings lm_head IS embed_tokens."""
    config, resolved = load_config(path)
    spec = check_architecture(config)
    index = index if index is not None else CheckpointIndex(resolved)
    tied = bool(getattr(config, "tie_word_embeddings", False)) or spec.lm_head not in index
    names = [spec.embed_tokens, spec.final_norm] + ([] if tied else [spec.lm_head])
    tensors = index.read(names, device)
    embed = tensors[spec.embed_tokens]
    return {
        "embed_tokens": embed,
        "norm": tensors[spec.final_norm],
        "lm_head": embed if tied else tensors[spec.lm_head],
    }
