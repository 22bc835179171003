"""``AutoDistributedModelForCausalLM``: picks the distributed class for a checkpoint and its options.

It sits above client/model.py (the plain distributed model) and client/ptune.py (the same with
trainable prompts, a subclass of it), so neither imports the other's dependents: no cycle.
"""

from __future__ import annotations

import os
from typing import Any

from .model import DistributedLlamaForCausalLM
from .ptune import DistributedLlamaForCausalLMWithPrompts

__all__ = ["AutoDistributedModelForCausalLM"]


class AutoDistributedModelForCausalLM:
    """``AutoDistributedModelForCausalLM.from_pretrained(...)`` picks the class for the checkpoint's architecture."""

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **kwargs: Any) -> DistributedLlamaForCausalLM:
        # Llama, Mistral and Qwen2 share the client side (embeddings, RMS norm, head);
        # load_config has already refused unsupported architectures.
        if kwargs.get("tuning_mode"):  # trainable prompts: client/ptune.py
            return DistributedLlamaForCausalLMWithPrompts.from_pretrained(path_or_name, **kwargs)
        kwargs.pop("tuning_mode", None)
        return DistributedLlamaForCausalLM.from_pretrained(path_or_name, **kwargs)
