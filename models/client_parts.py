"""The parts of a model a client keeps locally: token embeddings, final norm, LM head.

Read from the shards without touching any block (``checkpoint.load_client_parts``).
With tied embeddings (``tie_word_embeddings``, e.g. SmolLM2) the LM head shares the
embedding matrix, so it costs no extra memory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from biopetals.models.blocks import DTYPES
from biopetals.models.checkpoint import CheckpointIndex, load_client_parts
from biopetals.models.config import check_architecture, load_config


class ClientParts(nn.Module):
    """``embed(input_ids) -> hidden`` before the blocks, ``logits(hidden)`` after them."""

    def __init__(self, config: PretrainedConfig, embed_tokens: nn.Embedding, norm: nn.Module, lm_head: nn.Linear):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        index: CheckpointIndex | None = None,
    ) -> "ClientParts":
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        config, resolved = load_config(path)
        config = copy.deepcopy(config)
        spec = check_architecture(config)
        tensors = load_client_parts(resolved, index=index, device=device)
        embed_w = tensors["embed_tokens"].to(dtype=dtype)
        embed = nn.Embedding.from_pretrained(embed_w, freeze=True, padding_idx=config.pad_token_id)
        norm = spec.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight = nn.Parameter(tensors["norm"].to(dtype=dtype, device=device), requires_grad=False)
        head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
        if tensors["lm_head"] is tensors["embed_tokens"]:
            head.weight = embed.weight  # tied: one matrix
        else:
            head.weight = nn.Parameter(tensors["lm_head"].to(dtype=dtype, device=device), requires_grad=False)
        return cls(config, embed, norm.to(device), head)

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm then LM head, as ``LlamaForCausalLM`` does after the last block."""
        hidden = hidden.to(self.lm_head.weight.dtype)
        return self.lm_head(self.norm(hidden))

    def nbytes(self) -> int:
        """Bytes of the distinct tensors held (a tied head is counted once)."""
        seen = {}
        for t in list(self.parameters()) + list(self.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())
