"""The distributed causal LM: a transformers model whose decoder layers run on the swarm.

``DistributedLlamaForCausalLM.from_pretrained(path, initial_peers=[...], swarm_key="lab.key")``
loads locally only the token embeddings, the final norm and the LM head
(``models.client_parts.ClientParts``, read from the shards without any block);
blocks ``[0, N)`` are remote. The class is a ``PreTrainedModel`` with
``GenerationMixin``, so ``generate()`` is transformers' own: greedy, sampling,
repetition penalty, stopping criteria, streamers, batches with left padding.

How it plugs into ``generate()`` (transformers 5.x, through its public cache contract
only; see ``generation_contract``): ``generate()`` here opens an ``InferenceSession``
sized for the prompt plus the new tokens and hands transformers a ``RemoteCache`` - a
``Cache`` that holds no tensors, only the session and the number of tokens it has taken
in this call - as a user-defined cache, under the keyword this transformers uses
(``past_key_values``, or ``cache`` since 5.24). generate then runs prefill and one token
per step; each ``forward`` sends the new tokens' embeddings through the session (KV caches
live on the nodes) and computes logits locally. ``forward`` takes the cache under either
name and raises on anything it does not understand, and if generate ever calls it without
the cache it was given, it raises instead of decoding statelessly.
A padded batch runs as one session: each step carries the padding mask of its new
tokens (spec/messages.md §8.1) and the nodes derive positions from it exactly as
generate() does, ``cumsum(attention_mask) - 1`` (§5.6).

Speculative decoding is transformers' own too (``prompt_lookup_num_tokens=K``,
``assistant_model=draft``): the candidates go through the session as one step, and
``RemoteCache.crop`` rolls the session back to the accepted tokens; the next step tells the
nodes to cut their caches (``Step.truncate``, spec/messages.md §5.6.1). ``is_croppable``
refuses a route with a node that cannot (``RollbackUnsupportedError``).

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
import transformers
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from biopetals.models.blocks import max_positions
from biopetals.models.client_parts import ClientParts
from biopetals.models.config import load_config, model_info
from biopetals.models.hub import HubCheckpoint, is_hub_name
from biopetals.models.step import positions_from_mask
from biopetals.weights.source import fetch_client_parts

from .errors import RequestError
from .generation_contract import (UnsupportedTransformersError, cache_keyword, check_forward_kwargs,
                                  check_generate_options, check_positions, generate_total_length, output_cache_field,
                                  pop_cache, speculation_margin)
from .remote_forward import remote_blocks
from .session import InferenceSession
from .swarm import ClientConfig, RemoteSwarm

__all__ = ["RemoteCache", "DistributedLlamaForCausalLM"]

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
        """Speculative decoding asks this once its first forward ran: every node of the route must
        roll back (spec/messages.md §5.6.1), else ``RequestError`` names those that do not."""
        self.session.check_rollback()
        return True

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search is not supported over the swarm (the caches live on the nodes)")

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count), as
        speculative decoding does with rejected candidates: the session's position and replay history are
        cut now, and the nodes cut their caches with the next step (spec/messages.md §5.6.1)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as "
                             "transformers' caches take it")
        if -tokens_to_remove > self.get_seq_length():
            raise ValueError(f"crop({tokens_to_remove}): this call has only {self.get_seq_length()} tokens")
        self.session.crop(self.session.position + tokens_to_remove)

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
        self._generating: RemoteCache | None = None  # the cache of the generate() call running now
        self.last_route: list[list[tuple[str, int, int]]] = []
        self.last_rollbacks = 0  # rollbacks (rejected candidates) of the last generate() call's own session

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
        weights_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        **client_options: Any,
    ) -> "DistributedLlamaForCausalLM":
        """Load the client parts of a checkpoint and connect to the swarm.

        ``initial_peers``: multiaddrs of DHT peers of the swarm (any node).
        ``swarm_key``: the swarm key file (or its 32 raw bytes) of a private swarm.
        ``codec``: activations on the wire, ``"f16"`` (default) or ``"f32"`` (lossless).
        ``model_name``: the swarm name, if the nodes were started from a copy named otherwise.
        ``path_or_name`` may also be a weights manifest file or a swarm name ``<name>.<16 hex>``
        (spec/weights.md): the embeddings, norm, head and tokenizer are then fetched from the
        swarm's peers into ``weights_dir`` (default ``$BIOPETALS_CACHE/models/<swarm name>``).
        A Hugging Face hub name ``org/name`` downloads (at ``revision``) only the config, the
        tokenizer and the shards holding the embeddings, norm and head (models/hub.py).
        Further options: fields of ``ClientConfig`` (``step_timeout``, ``max_failovers``, ...).
        """
        if isinstance(path_or_name, str) and is_hub_name(path_or_name):
            path_or_name = str(HubCheckpoint(path_or_name, revision=revision).fetch_client())
        path_or_name = fetch_client_parts(path_or_name, weights_dir=weights_dir, initial_peers=initial_peers,
                                          swarm_key=swarm_key)
        config, resolved = load_config(path_or_name)
        parts = ClientParts.load(resolved, dtype=dtype)
        name = model_name or model_info(path_or_name, config).dht_prefix
        key = os.fspath(swarm_key) if isinstance(swarm_key, (str, os.PathLike)) else swarm_key
        client_config = ClientConfig(initial_peers=tuple(str(p) for p in initial_peers), swarm_key=key, codec=codec,
                                     **client_options)
        swarm = RemoteSwarm(name, int(config.num_hidden_layers), client_config, int(config.hidden_size),
                            max_positions(config))
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
        self.check_context(max_length)
        session = InferenceSession(self.swarm, max_length=max_length, batch_size=batch_size)
        self._session = session
        try:
            yield session
        finally:
            self._session = None
            self.last_route = session.route
            session.close()

    @property
    def context_length(self) -> int:
        """The most positions the model takes (``max_position_embeddings``)."""
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def check_context(self, total_tokens: int, *, prompt_tokens: int | None = None) -> None:
        """``RequestError`` (a ValueError), before any route is tried, when ``total_tokens`` (prompt plus new tokens)
        exceeds the model's context: no node could hold them, and asking would only mark healthy
        nodes as failing."""
        if total_tokens <= self.context_length:
            return
        what = (f"the prompt has {prompt_tokens} tokens and {total_tokens - prompt_tokens} new tokens were asked for"
                if prompt_tokens is not None else f"a session of max_length={total_tokens} tokens was asked for")
        # the same refusal as the chain state's length check (client/chain.py), made before any route is tried
        raise RequestError.before_sending(
            f"this model's context is {self.context_length} tokens (the model has {self.context_length} positions, "
            f"its max_position_embeddings): {what}; shorten the prompt or ask for fewer new tokens")

    @property
    def active_session(self) -> InferenceSession | None:
        return self._session

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 **kwargs: Any):  # type: ignore[override]
        """transformers' ``generate``, with the KV caches on the nodes; beam search is not supported.

        The ``RemoteCache`` goes to transformers as a user-defined cache under the keyword
        this transformers uses (``generation_contract.cache_keyword``): its public contract,
        no private generate internals overridden. Outside ``inference_session()`` a session
        is opened for this call, sized for the prompt plus the new tokens, and closed after.
        """
        beams = kwargs.get("num_beams") or getattr(generation_config or self.generation_config, "num_beams", 1)
        if int(beams or 1) > 1:
            raise ValueError("beam search (num_beams > 1) is not supported over the swarm; use greedy or sampling")
        check_generate_options(self.generation_config, generation_config, kwargs)
        cache = pop_cache(kwargs)
        if cache is not None and not isinstance(cache, RemoteCache):
            raise TypeError(f"the cache of a distributed model must be a RemoteCache, not {type(cache).__name__}: "
                            "its keys and values live on the nodes")
        use_cache = kwargs.get("use_cache", getattr(generation_config or self.generation_config, "use_cache", True))
        owned = None
        if cache is None and use_cache is not False:
            if self._session is not None:
                cache = RemoteCache(self._session)
            else:
                prompt = inputs if inputs is not None else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
                if prompt is None:
                    raise ValueError("generate() over the swarm needs a prompt (input_ids or inputs_embeds)")
                length = generate_total_length(self.generation_config, int(prompt.shape[1]), generation_config,
                                               kwargs)
                self.check_context(length, prompt_tokens=int(prompt.shape[1]))
                # room for the candidates of a last verification step (speculative decoding)
                margin = speculation_margin(self.generation_config, generation_config, kwargs)
                length = max(length, min(length + margin, self.context_length))
                owned = InferenceSession(self.swarm, max_length=length)
                cache = RemoteCache(owned, owned=True)
        if cache is not None:
            kwargs[cache_keyword()] = cache
        self._generating = cache
        try:
            return super().generate(inputs, generation_config, **kwargs)
        finally:
            self._generating = None
            if owned is not None:
                self.last_route = owned.route
                self.last_rollbacks = owned.rollbacks
                owned.close()
            if self._session is not None:
                self.last_route = self._session.route

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache_position: torch.LongTensor | None = None,
        cache: RemoteCache | None = None,
        past_key_values: RemoteCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss with ``labels``); through the session of a ``RemoteCache``, else stateless.

        The cache comes as ``cache=`` or ``past_key_values=`` (transformers' old and new
        names). Keywords this model does not understand raise instead of being ignored.
        """
        cache = pop_cache({"cache": cache, "past_key_values": past_key_values})
        loss_kwargs = check_forward_kwargs(type(self).__name__, kwargs)
        if cache is not None and not isinstance(cache, RemoteCache):
            raise TypeError(f"the cache of a distributed model must be a RemoteCache, not {type(cache).__name__}")
        if cache is None and self._generating is not None:
            # generate() was handed a RemoteCache but called us without it: it would decode every
            # step statelessly on the newest token alone, a wrong answer that looks right.
            raise UnsupportedTransformersError(
                f"generate() called forward() without the RemoteCache it was given (transformers "
                f"{transformers.__version__} passes the cache under a name this client does not know); "
                "install the versions of constraints.txt")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        self._check_positions(cache, inputs_embeds.shape[1], attention_mask, position_ids, cache_position)
        if cache is not None:
            hidden = cache.session.step(inputs_embeds, attention_mask).to(inputs_embeds.dtype)
        else:
            hidden = self._stateless(inputs_embeds, attention_mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(self.model.norm(hidden))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{output_cache_field(): cache})

    @staticmethod
    def _check_positions(cache: RemoteCache | None, new_tokens: int, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None, cache_position: torch.Tensor | None) -> None:
        """Positions the caller passes must be those the nodes derive (spec/messages.md §5.6)."""
        past = cache.get_seq_length() if cache is not None else 0
        columns = torch.arange(past, past + new_tokens).unsqueeze(0)
        check_positions("cache_position", cache_position, columns[0], None)
        if position_ids is None:
            return
        if attention_mask is not None and cache is not None:
            # a session's nodes number the tokens of each row as generate() does: cumsum(mask) - 1
            columns = attention_mask.shape[1]
            check_positions("position_ids", position_ids,
                            positions_from_mask(attention_mask, columns - new_tokens, new_tokens),
                            attention_mask[:, -new_tokens:])
        else:
            valid = None if attention_mask is None else attention_mask[:, -new_tokens:]
            check_positions("position_ids", position_ids, columns, valid)

    def _stateless(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Forward through all blocks without a session; the padding mask travels with the batch
        (spec/messages.md §6.1, §8.1): positions ``0 .. T - 1`` as transformers' model uses."""
        mask = None if attention_mask is None else attention_mask[:, -embeds.shape[1]:]
        return remote_blocks(self.swarm, embeds, mask).to(embeds.dtype)
