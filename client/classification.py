"""``DistributedLlamaForSequenceClassification``: a classification head on the client, the blocks on the swarm.

As transformers' ``LlamaForSequenceClassification``: the final norm's output goes
through ``score`` (``Linear(hidden, num_labels, bias=False)``), and each row's logits
are taken at its last token that is not ``pad_token_id`` (left or right padding);
the loss is transformers' own for the config's ``problem_type``. The head is new
(random, ``initializer_range``) and trainable; the client's other weights are
frozen with a tuning mode (``"ptune"``/``"deep_ptune"``, client/ptune.py), which
trains the same way: ``loss.backward()`` through the nodes, a torch optimizer.

The client loads the embeddings and norm; the checkpoint's LM head is dropped
after loading (it is not used).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from .model import DistributedLlamaForCausalLM
from .ptune import PromptTuningMixin

__all__ = ["DistributedLlamaForSequenceClassification", "AutoDistributedModelForSequenceClassification"]


class DistributedLlamaForSequenceClassification(PromptTuningMixin, DistributedLlamaForCausalLM):
    """Sequence classification over the swarm. Build with ``from_pretrained(path, num_labels=...)``."""

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, num_labels: int = 2,  # type: ignore[override]
                        **kwargs: Any) -> "DistributedLlamaForSequenceClassification":
        """As ``DistributedLlamaForCausalLM.from_pretrained``, plus ``num_labels`` and optionally
        ``tuning_mode``/``pre_seq_len`` (client/ptune.py)."""
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, not {num_labels!r}")
        model = super().from_pretrained(path_or_name, **kwargs)
        model.config.num_labels = num_labels
        model.num_labels = num_labels
        model.lm_head = None  # a classifier has no use for it
        model.score = nn.Linear(model.config.hidden_size, num_labels, bias=False,
                                dtype=model.model.embed_tokens.weight.dtype)
        nn.init.normal_(model.score.weight, std=float(getattr(model.config, "initializer_range", 0.02)))
        return model

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden = self._stateless(inputs_embeds, attention_mask)
        logits = self.score(self.model.norm(hidden))
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("cannot handle batch sizes > 1 without a padding token (config.pad_token_id)")
        if pad is None or input_ids is None:
            last = torch.full((batch,), logits.shape[1] - 1)  # inputs_embeds: padding cannot be seen
        else:  # as transformers: the rightmost token that is not padding
            keep = (input_ids != pad).to(torch.int32)
            last = (torch.arange(input_ids.shape[-1], dtype=torch.int32) * keep).argmax(-1)
        pooled = logits[torch.arange(batch), last]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)


class AutoDistributedModelForSequenceClassification:
    """``AutoDistributedModelForSequenceClassification.from_pretrained(path, num_labels=..., ...)``, as petals names it."""

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **kwargs: Any) -> DistributedLlamaForSequenceClassification:
        # Llama, Mistral and Qwen2 share the client side; load_config refuses other architectures.
        return DistributedLlamaForSequenceClassification.from_pretrained(path_or_name, **kwargs)
