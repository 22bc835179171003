"""Test helpers for fine-tuning: transformers' own model with prompts inserted as the spec says.

The reference for every prompt-tuning result is ``LlamaForCausalLM`` (or
``LlamaForSequenceClassification``) of the same checkpoint, with

* shallow prompts put in front of the input embeddings (``inputs_embeds``) and the
  attention mask grown with ones, and the outputs of the prompt positions dropped;
* deep prompts added by forward pre-hooks on transformers' own decoder layers:
  before layer ``i``, ``prompts[i]`` is added to the first ``P`` hidden positions
  (spec/messages.md §5.3/§8) - none of BioPetals' code is used.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def deep_prompt_hooks(layers, deep: torch.Tensor | None) -> Iterator[None]:
    """While inside, layer ``i`` of ``layers`` sees ``hidden[:, :P] + deep[i]`` (``deep``: ``[N, P, H]``)."""
    handles = []
    if deep is not None:
        for i, layer in enumerate(layers):
            def add(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                p = deep.shape[1]
                hidden = torch.cat([hidden[:, :p] + deep[i].to(hidden.dtype), hidden[:, p:]], dim=1)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            handles.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def with_prompts(model, ids: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor,
                 deep: torch.Tensor | None, **kwargs):
    """``model`` (a transformers Llama model with a ``.model``) on ``ids`` with shallow ``prompts``
    ``[P, H]`` in front and ``deep`` ``[N, P, H]`` per layer; returns its output (prompt positions included)."""
    batch, p = ids.shape[0], prompts.shape[0]
    embeds = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), model.model.embed_tokens(ids)], dim=1)
    if mask is not None:
        mask = torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1)
    with deep_prompt_hooks(model.model.layers, deep):
        return model(inputs_embeds=embeds, attention_mask=mask, **kwargs)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
