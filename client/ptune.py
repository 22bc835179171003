"""Trainable prompts on the client: prompt tuning (``"ptune"``) and deep prompt tuning (``"deep_ptune"``).

As petals does it (``tuning_mode`` / ``pre_seq_len``):

* ``ptune``: ``pre_seq_len`` trainable embeddings ``[P, hidden]`` are put in front of
  every sequence's input embeddings; the blocks see ``P + T`` tokens, and the outputs
  of the ``P`` prompt positions are dropped before the norm and head, so logits and
  labels keep the caller's ``T`` positions.
* ``deep_ptune``: ``ptune``, plus one trainable ``[P, hidden]`` per block, sent as the
  ``prompts`` tensor of ``Forward``/``Backward`` (spec/messages.md §6, §8): the node
  adds ``prompts[i]`` to the first ``P`` hidden positions before block ``i``. They
  start at zero, so an untrained deep prompt changes nothing.

``loss.backward()`` brings gradients to both through the nodes' ``Backward``
(``grad_inputs`` for the shallow prompts, ``grad_prompts`` for the deep ones). In a
tuning mode the client's own weights (embeddings, norm, head) are frozen, so an
optimizer over ``model.parameters()`` with ``requires_grad`` trains the prompts only;
set ``requires_grad_(True)`` on them to train them too.

Prompts live in fp32 whatever the model's dtype (their optimizer state too), as in
petals. Generation with prompts: ``generate(..., use_cache=False)`` (each token
recomputes the sequence statelessly), or step by step with KV caches on the nodes:
``model.inference_step(session, input_ids)`` in ``with model.inference_session(...)``
(the first step carries the prompts, spec/messages.md §5.3). ``generate()`` with a
cache refuses a prompt-tuned model: its cache bookkeeping does not know the prefix.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from .model import DistributedLlamaForCausalLM, RemoteCache
from .remote_forward import remote_blocks
from .session import InferenceSession

__all__ = ["TUNING_MODES", "check_tuning", "PromptTuning", "PromptTuningMixin", "DistributedLlamaForCausalLMWithPrompts"]

TUNING_MODES = ("ptune", "deep_ptune")


def check_tuning(tuning_mode: str, pre_seq_len: int) -> None:
    if tuning_mode not in TUNING_MODES:
        raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, not {tuning_mode!r}")
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len < 1:
        raise ValueError(f"pre_seq_len must be a positive int with tuning_mode={tuning_mode!r}, not {pre_seq_len!r}")


class PromptTuning(nn.Module):
    """The trainable prompts of one model: ``prompts`` ``[P, H]`` and, when deep, ``deep`` ``[N, P, H]``."""

    def __init__(self, config: PretrainedConfig, tuning_mode: str, pre_seq_len: int) -> None:
        super().__init__()
        check_tuning(tuning_mode, pre_seq_len)
        hidden, blocks = int(config.hidden_size), int(config.num_hidden_layers)
        self.tuning_mode = tuning_mode
        self.pre_seq_len = pre_seq_len
        std = float(getattr(config, "initializer_range", 0.02))
        self.prompts = nn.Parameter(torch.randn(pre_seq_len, hidden) * std)  # petals' init
        self.deep = nn.Parameter(torch.zeros(blocks, pre_seq_len, hidden)) if tuning_mode == "deep_ptune" else None

    def extend(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``embeds`` ``[B, T, H]`` with the prompts in front ``[B, P + T, H]``; the mask grows with ones."""
        batch = embeds.shape[0]
        front = self.prompts.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        if mask is not None:
            mask = torch.cat([torch.ones(batch, self.pre_seq_len, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return torch.cat([front, embeds], dim=1), mask

    def block_prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The deep prompts as the wire wants them: ``[N, batch, P, H]`` (spec/messages.md §8)."""
        if self.deep is None:
            return None
        return self.deep.to(dtype).unsqueeze(1).expand(-1, batch, -1, -1)


class PromptTuningMixin:
    """Adds ``init_prompts`` and runs the stateless forward with the prompts (before a distributed model class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tuning: PromptTuning | None = None

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, *, tuning_mode: str | None = None,
                        pre_seq_len: int = 0, **kwargs: Any):
        """The distributed class's ``from_pretrained``, then ``init_prompts(tuning_mode, pre_seq_len)``."""
        if tuning_mode is not None:  # refuse a bad mode before connecting
            check_tuning(tuning_mode, pre_seq_len)
        model = super().from_pretrained(path_or_name, **kwargs)  # type: ignore[misc]
        model.init_prompts(tuning_mode, pre_seq_len)
        return model

    def init_prompts(self, tuning_mode: str | None, pre_seq_len: int = 0) -> None:
        """Freeze the client's weights and add trainable prompts (no-op without a tuning mode)."""
        if not tuning_mode:
            return
        self.requires_grad_(False)  # type: ignore[attr-defined]
        self.tuning = PromptTuning(self.config, tuning_mode, pre_seq_len)  # type: ignore[attr-defined]

    def _stateless(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.tuning is None:
            return super()._stateless(embeds, attention_mask)  # type: ignore[misc]
        mask = None if attention_mask is None else attention_mask[:, -embeds.shape[1]:]
        x, mask = self.tuning.extend(embeds, mask)
        hidden = remote_blocks(self.swarm, x, mask, self.tuning.block_prompts(x.shape[0], x.dtype))  # type: ignore[attr-defined]
        return hidden[:, self.tuning.pre_seq_len:].to(embeds.dtype)

    def prompt_state(self) -> dict[str, Any]:
        """What to save of a prompt-tuned model: its mode, length and prompt tensors."""
        if self.tuning is None:
            raise ValueError("this model has no tuning_mode")
        return {"tuning_mode": self.tuning.tuning_mode, "pre_seq_len": self.tuning.pre_seq_len,
                "state_dict": {k: v.detach().cpu() for k, v in self.tuning.state_dict().items()}}

    def load_prompt_state(self, state: dict[str, Any]) -> None:
        """Load what ``prompt_state`` returned (mode and length must match)."""
        if self.tuning is None or (state["tuning_mode"], state["pre_seq_len"]) != (
                self.tuning.tuning_mode, self.tuning.pre_seq_len):
            raise ValueError(f"saved prompts are {state['tuning_mode']} x {state['pre_seq_len']}; this model's differ")
        self.tuning.load_state_dict(state["state_dict"])


class DistributedLlamaForCausalLMWithPrompts(PromptTuningMixin, DistributedLlamaForCausalLM):
    """``DistributedLlamaForCausalLM`` with trainable prompts; what
    ``AutoDistributedModelForCausalLM.from_pretrained(..., tuning_mode=..., pre_seq_len=P)`` returns."""

    def forward(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        # the cache keyword is ``past_key_values`` before transformers 5.x's rename to ``cache``
        if self.tuning is not None and any(isinstance(kwargs.get(k), RemoteCache) for k in ("past_key_values", "cache")):
            raise NotImplementedError("generate() with a cache does not carry trained prompts; use "
                                      "generate(..., use_cache=False) or model.inference_step(session, input_ids)")
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def inference_step(self, session: InferenceSession, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` of the next ``input_ids`` through ``session`` (KV caches on the nodes).

        The session's first step puts the prompts in front (and sends the deep prompts
        with it, spec/messages.md §5.3); later steps are plain, as the prompt positions
        are already in the caches. Unpadded batches.
        """
        embeds = self.model.embed_tokens(input_ids)
        if self.tuning is None:
            return self.lm_head(self.model.norm(session.step(embeds).to(embeds.dtype)))
        if session.position == 0:
            x, _ = self.tuning.extend(embeds, None)
            hidden = session.step(x, prompts=self.tuning.block_prompts(x.shape[0], x.dtype))[:, self.tuning.pre_seq_len:]
        else:
            hidden = session.step(embeds)
        return self.lm_head(self.model.norm(hidden.to(embeds.dtype)))

