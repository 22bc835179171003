"""The distributed causal LM: a transformers model whose decoder layers run on the swarm.

``DistributedLlamaForCausalLM.from_pretrained(path, initial_peers=[...], swarm_key="lab.key")``
loads locally only the token embeddings, the final norm and the LM head
(``models.client_parts.ClientParts``, read from the shards without any block);
blocks ``[0, N)`` are remote. The class is a ``PreTrainedModel`` with
``GenerationMixin``, so ``generate()`` is transformers' own: greedy, sampling,
repetition penalty, stopping criteria, streamers, batches with left padding.

How it plugs into ``generate()`` (transformers 5.x): generate asks the model to
prepare its cache (``_prepare_cache_for_generation``); we hand it a
``RemoteCache`` - a ``Cache`` that holds no tensors, only an ``InferenceSession``
and the number of tokens that session has taken in this call. generate then runs
prefill and one token per step; each ``forward`` sends the new tokens' embeddings
through the session (KV caches live on the nodes) and computes logits locally.
A padded batch runs as one session: each step carries the padding mask of its new
tokens (spec/messages.md §8.1) and the nodes derive positions from it exactly as
generate() does, ``cumsum(attention_mask) - 1`` (§5.6).

Inside ``with model.inference_session(max_length=...) as s:``, ``generate()``
continues that session: pass only the *new* tokens; the output is those tokens
followed by the generated ones.

``model(input_ids, labels=...)`` without a cache is a stateless forward through
the nodes (``Forward``), differentiable: ``loss.backward()`` runs the nodes'
``Backward`` and fills the gradients of client-side parameters.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from biopetals.models.client_parts import ClientParts
from biopetals.models.config import load_config, model_info

from .remote_forward import remote_blocks
from .session import InferenceSession
from .swarm import ClientConfig, RemoteSwarm

__all__ = ["RemoteCache", "DistributedLlamaForCausalLM", "AutoDistributedModelForCausalLM"]

log = logging.getLogger("biopetals.client")


class RemoteCache(Cache):
    """A ``Cache`` whose keys and values live on the nodes: it only counts tokens seen in this call."""

    def __init__(self, session: InferenceSession, owned: bool = False) -> None:
        super().__init__(layers=[])
        self.session = session
        self.owned = owned  # generate() opened the session and closes it
        self.base = session.position

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.base

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.session.max_length

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported over the swarm (the caches live on the nodes)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a remote session cannot be cropped")

    def __repr__(self) -> str:
        return f"RemoteCache(position={self.session.position}, base={self.base})"


class _ClientModel(nn.Module):
    """What the client holds of the decoder: embeddings and the final norm (``model.*`` names)."""

    def __init__(self, parts: ClientParts) -> None:
        super().__init__()
        self.embed_tokens = parts.embed_tokens
        self.norm = parts.norm


class DistributedLlamaForCausalLM(LlamaPreTrainedModel, GenerationMixin):
    """A Llama-family causal LM with remote decoder layers. Build with ``from_pretrained``."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: PretrainedConfig, parts: ClientParts, swarm: RemoteSwarm) -> None:
        super().__init__(config)
        self.model = _ClientModel(parts)
        self.lm_head = parts.lm_head
        self.vocab_size = config.vocab_size
        self.swarm = swarm
        self._session: InferenceSession | None = None
        self._owned: list[InferenceSession] = []
        self.last_route: list[list[tuple[str, int, int]]] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_name: str | os.PathLike,
        *,
        initial_peers: list[str] | tuple[str, ...] = (),
        swarm_key: str | os.PathLike | bytes | None = None,
        dtype: torch.dtype = torch.float32,
        codec: str = "f16",
        model_name: str | None = None,
        **client_options: Any,
    ) -> "DistributedLlamaForCausalLM":
        """Load the client parts of a checkpoint and connect to the swarm.

        ``initial_peers``: multiaddrs of DHT peers of the swarm (any node).
        ``swarm_key``: the swarm key file (or its 32 raw bytes) of a private swarm.
        ``codec``: activations on the wire, ``"f16"`` (default) or ``"f32"`` (lossless).
        ``model_name``: the swarm name, if the nodes were started from a copy named otherwise.
        Further options: fields of ``ClientConfig`` (``step_timeout``, ``max_failovers``, ...).
        """
        config, resolved = load_config(path_or_name)
        parts = ClientParts.load(resolved, dtype=dtype)
        name = model_name or model_info(path_or_name, config).dht_prefix
        key = os.fspath(swarm_key) if isinstance(swarm_key, (str, os.PathLike)) else swarm_key
        client_config = ClientConfig(initial_peers=tuple(str(p) for p in initial_peers), swarm_key=key, codec=codec,
                                     **client_options)
        swarm = RemoteSwarm(name, int(config.num_hidden_layers), client_config)
        try:
            model = cls(config, parts, swarm)
            if (Path(resolved) / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(resolved)
            else:
                model.generation_config = GenerationConfig.from_model_config(config)
            model.name_or_path = str(path_or_name)
        except BaseException:
            swarm.close()
            raise
        return model.eval()

    def close(self) -> None:
        """Close sessions and the network (also done at interpreter exit)."""
        if self._session is not None:
            self._session.close()
        self.swarm.close()

    def __enter__(self) -> "DistributedLlamaForCausalLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def client_nbytes(self) -> int:
        """Bytes of the tensors held locally (a tied head counted once)."""
        seen = {}
        for t in list(self.parameters()) + list(self.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return sum(seen.values())

    # ------------------------------------------------------------------ sessions

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[InferenceSession]:
        """A session holding KV caches on the nodes; ``generate()`` inside continues it."""
        if self._session is not None:
            raise RuntimeError("an inference session is already active on this model")
        session = InferenceSession(self.swarm, max_length=max_length, batch_size=batch_size)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            self.last_route = session.route
            session.close()

    @property
    def active_session(self) -> InferenceSession | None:
        return self._session

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        if isinstance(model_kwargs.get("past_key_values"), RemoteCache):
            return
        if model_kwargs.get("past_key_values") is not None:
            raise ValueError("past_key_values of this model must be a RemoteCache (or none)")
        if generation_config.use_cache is False:
            return
        if self._session is not None:
            model_kwargs["past_key_values"] = RemoteCache(self._session)
            return
        session = InferenceSession(self.swarm, max_length=max(int(max_cache_length), 1) + 1)
        self._owned.append(session)
        model_kwargs["past_key_values"] = RemoteCache(session, owned=True)

    def generate(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        """transformers' ``generate``; beam search is not supported."""
        if int(kwargs.get("num_beams") or getattr(kwargs.get("generation_config"), "num_beams", 1) or 1) > 1:
            raise ValueError("beam search (num_beams > 1) is not supported over the swarm; use greedy or sampling")
        try:
            return super().generate(*args, **kwargs)
        finally:
            owned, self._owned = self._owned, []
            for session in owned:
                self.last_route = session.route
                session.close()
            if self._session is not None:
                self.last_route = self._session.route

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if isinstance(past_key_values, RemoteCache):
            hidden = past_key_values.session.step(inputs_embeds, attention_mask)
            hidden = hidden.to(inputs_embeds.dtype)
        elif past_key_values is not None:
            raise ValueError("past_key_values of this model must be a RemoteCache (or none)")
        else:
            hidden = self._stateless(inputs_embeds, attention_mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(self.model.norm(hidden))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def _stateless(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Forward through all blocks without a session; the padding mask travels with the batch
        (spec/messages.md §6.1, §8.1): positions ``0 .. T - 1`` as transformers' model uses."""
        mask = None if attention_mask is None else attention_mask[:, -embeds.shape[1]:]
        return remote_blocks(self.swarm, embeds, mask).to(embeds.dtype)


class AutoDistributedModelForCausalLM:
    """``AutoDistributedModelForCausalLM.from_pretrained(...)`` picks the class for the checkpoint's architecture."""

    @classmethod
    def from_pretrained(cls, path_or_name: str | os.PathLike, **kwargs: Any) -> DistributedLlamaForCausalLM:
        # Llama, Mistral and Qwen2 share the client side (embeddings, RMS norm, head);
        # load_config has already refused unsupported architectures.
        if kwargs.get("tuning_mode"):  # trainable prompts: client/ptune.py
            from .ptune import DistributedLlamaForCausalLMWithPrompts
            return DistributedLlamaForCausalLMWithPrompts.from_pretrained(path_or_name, **kwargs)
        kwargs.pop("tuning_mode", None)
        return DistributedLlamaForCausalLM.from_pretrained(path_or_name, **kwargs)
