"""Run a contiguous span of transformer blocks [start, end) with transformers' own decoder layers.

A node serves a ``BlockSpan``; the client never builds one. Each block is the
architecture's decoder layer class (``LlamaDecoderLayer`` etc., see
``biopetals.models.config.ARCHITECTURES``) built on the meta device and filled
with exactly its own tensors from the shards (``checkpoint.load_block_state``),
so nothing else is ever materialised.

What a span computes, for hidden states ``[B, T, H]``:

* positions: ``position_ids`` ``[B, T]`` (or ``[T]`` / ``[1, T]``), default
  ``past_length + arange(T)``. They feed the architecture's rotary embedding
  (Llama-3 ``rope_scaling`` included), computed once per call as transformers'
  model does, then passed to every layer as ``position_embeddings``.
* attention mask: causal, plus an optional padding mask (1 = real token,
  0 = padding), either for all tokens so far ``[B, past + T]`` as transformers
  takes it, or for the new tokens only ``[B, T]`` (the cache remembers earlier
  ones). Built with transformers' ``create_causal_mask``, as the model does.
  Left-padded rows use positions ``cumsum(mask) - 1`` like ``generate()``
  (``models.step.positions_from_mask``, the one place they are computed).
* a node's session step: ``run_step(SpanStep, cache)`` takes a step checked once by
  the node's session state machine (node/session_machine.py) and computes it; only
  our own invariants are checked there (``SpanInputError``: a bug if it happens).
* KV cache (inference): a ``SpanCache`` holds one transformers cache layer per
  block, preallocated for ``max_length`` tokens when it is created, so a node
  reserves the memory up front (``kv_cache_bytes`` tells how much before
  allocating). Tokens are appended in order; ``cache.length`` is the number
  stored.
* deep prompts (fine-tuning, as petals does): ``prompts`` ``[n_blocks, B or 1, P, H]``;
  before block ``j`` of the span, ``prompts[j]`` is added to the first ``P``
  positions of the hidden states of this call (petals:
  ``hidden_states[:, :P] += prompt``; done out of place here so autograd sees it).
  With a cache the client sends prompts with the call that starts at position 0.
* stateless forward (no cache) is differentiable; ``backward`` recomputes it and
  returns gradients for the inputs and the prompts (weights stay frozen).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, StaticLayer
from transformers.masking_utils import create_causal_mask

from biopetals.models.checkpoint import CheckpointIndex, load_block_state
from biopetals.models.config import ArchSpec, ModelConfigError, check_architecture, load_config
from biopetals.models.step import SpanStep
from biopetals.models.transformers_contract import cache_keyword_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# the keyword create_causal_mask takes the cache under in this transformers (models/transformers_contract.py)
_MASK_CACHE_KEYWORD = cache_keyword_of(create_causal_mask)


class SpanInputError(ValueError):
    """A call to a span had inputs that cannot be run (wrong shape, cache overflow, ...).

    Our caller's mistake, never a peer's (as h11's ``LocalProtocolError``): the node
    checks every request once where it enters (node/session_machine.py) and hands the
    blocks only checked values; reaching this from the node is a bug, answered
    ``INTERNAL``. The message says what was wrong.
    """


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_positions(config: PretrainedConfig) -> int:
    """Longest sequence a span serves. An active sliding window (Mistral v0.1) caps it:
    within the window, sliding attention equals the full causal attention we compute."""
    limit = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if window:
        limit = min(limit, int(window))
    return limit


def kv_cache_bytes(
    config: PretrainedConfig, n_blocks: int, dtype: torch.dtype, batch_size: int = 1, tokens: int = 1
) -> int:
    """Bytes of KV cache for ``tokens`` tokens of ``batch_size`` sequences over ``n_blocks`` blocks.

    Per token and block: keys and values, ``num_key_value_heads * head_dim`` each (GQA).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * n_blocks * config.num_key_value_heads * head_dim(config) * elem * batch_size * tokens


class _ReservedLayer(StaticLayer):
    """A StaticLayer (preallocated [B, kv_heads, max_length, head_dim]) that attends only
    to the filled prefix, so decode cost follows the tokens stored, not max_length."""

    is_compileable = False

    def update(self, key_states, value_states, *args, **kwargs):
        super().update(key_states, value_states)
        n = int(self.cumulative_length)
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return int(self.cumulative_length) + query_length, 0

    def get_seq_length(self) -> int:
        return int(self.cumulative_length)


class _SpanKVCache(Cache):
    """transformers Cache whose layer 0 is global block ``offset``: decoder layers keep
    their global ``layer_idx`` (Qwen2 looks up its layer type by it)."""

    def __init__(self, layers: list[_ReservedLayer], offset: int) -> None:
        super().__init__(layers=layers)
        self.offset = offset

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)


@dataclass
class SpanCache:
    """KV cache of one inference session on one span, preallocated for ``max_length`` tokens."""

    cache: _SpanKVCache
    start: int
    end: int
    batch_size: int
    max_length: int
    nbytes: int
    length: int = 0
    # bool [B, length], True = real token; None while no padding has been seen
    padding_mask: torch.Tensor | None = field(default=None, repr=False)

    @property
    def tokens_left(self) -> int:
        return self.max_length - self.length


class BlockSpan(nn.Module):
    """Blocks [start, end) of one checkpoint. Build with ``BlockSpan.load``."""

    def __init__(
        self,
        config: PretrainedConfig,
        spec: ArchSpec,
        layers: list[nn.Module],
        start: int,
        rotary: nn.Module,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.layers = nn.ModuleList(layers)
        self.start = start
        self.end = start + len(layers)
        self.rotary = rotary
        self.dtype = dtype
        self.device = device
        self.hidden_size = int(config.hidden_size)
        self.max_length = max_positions(config)
        # the keyword this transformers' decoder layer takes its KV cache under (refused if none)
        self.cache_keyword = cache_keyword_of(type(layers[0]).forward)

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        path: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
        progress: bool = False,
        index: CheckpointIndex | None = None,
    ) -> "BlockSpan":
        """Load blocks [start, end) of the checkpoint at ``path`` (directory or cached hub name)."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = torch.device(device)
        config, resolved = load_config(path)
        spec = check_architecture(config)
        n_layers = int(config.num_hidden_layers)
        if not 0 <= start < end <= n_layers:
            raise ModelConfigError(f"block span [{start}, {end}) is not inside [0, {n_layers})")
        config = copy.deepcopy(config)
        config._attn_implementation = attn_implementation
        index = index if index is not None else CheckpointIndex(resolved)
        layers = []
        for i in tqdm(range(start, end), desc=f"loading blocks {start}:{end}", disable=not progress, unit="block"):
            with torch.device("meta"):
                layer = spec.decoder_layer(config, i)
            state = load_block_state(resolved, i, index=index)
            state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
            try:
                layer.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as exc:
                raise ModelConfigError(f"block {i} tensors do not match {spec.architecture}: {exc}") from exc
            del state
            layer.requires_grad_(False)
            layer.eval()
            layers.append(layer)
        rotary = spec.rotary_embedding(config=config).to(device)
        return cls(config, spec, layers, start, rotary, dtype, device)

    @classmethod
    def random(cls, path: str | Path, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str = "sdpa") -> "BlockSpan":
        """Block 0 of the checkpoint's architecture with random weights and no file read: what a node
        measures its speed with before it holds any block (every block has the same shape)."""
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        device = torch.device(device)
        config, _ = load_config(path)
        spec = check_architecture(config)
        config = copy.deepcopy(config)
        config._attn_implementation = attn_implementation
        layer = spec.decoder_layer(config, 0).to(device=device, dtype=dtype)
        layer.requires_grad_(False)
        layer.eval()
        return cls(config, spec, [layer], 0, spec.rotary_embedding(config=config).to(device), dtype, device)

    def sub(self, start: int, end: int) -> "BlockSpan":
        """A view of blocks [start, end) inside this span, sharing weights."""
        if not self.start <= start < end <= self.end:
            raise SpanInputError(f"[{start}, {end}) is not inside this span [{self.start}, {self.end})")
        layers = list(self.layers)[start - self.start : end - self.start]
        return BlockSpan(self.config, self.spec, layers, start, self.rotary, self.dtype, self.device)

    @property
    def n_blocks(self) -> int:
        return self.end - self.start

    # ---------------------------------------------------------------- KV cache

    def cache_bytes_per_token(self, batch_size: int = 1) -> int:
        return kv_cache_bytes(self.config, self.n_blocks, self.dtype, batch_size)

    def allocate_cache(self, batch_size: int, max_length: int) -> SpanCache:
        """Preallocate (zero-filled, so the memory is really taken) a cache for ``max_length`` tokens."""
        if not 0 < max_length <= self.max_length:
            raise SpanInputError(f"max_length {max_length} not in [1, {self.max_length}]")
        if batch_size < 1:
            raise SpanInputError(f"batch_size {batch_size} < 1")
        cache = _SpanKVCache([_ReservedLayer(max_length) for _ in range(self.n_blocks)], offset=self.start)
        cache.early_initialization(
            batch_size, self.config.num_key_value_heads, head_dim(self.config), self.dtype, self.device
        )
        nbytes = kv_cache_bytes(self.config, self.n_blocks, self.dtype, batch_size, max_length)
        return SpanCache(cache, self.start, self.end, batch_size, max_length, nbytes)

    # ---------------------------------------------------------------- compute

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
        cache: SpanCache | None = None,
    ) -> torch.Tensor:
        """Run the span (the library entry: its arguments are checked here).

        With ``cache``, the new tokens are appended to it (call under no_grad). The node's
        sessions use ``run_step`` instead, with a step their state machine checked.
        """
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size:
            raise SpanInputError(f"hidden states must be [B, T, {self.hidden_size}], got {list(hidden.shape)}")
        batch, length = hidden.shape[:2]
        if length == 0:
            raise SpanInputError("no tokens")
        past = 0
        if cache is not None:
            self._check_cache(cache, batch, length)
            past = cache.length
        elif past + length > self.max_length:
            raise SpanInputError(f"{length} tokens exceed max length {self.max_length}")
        position_ids = self._positions(position_ids, batch, length, past)
        padding = self._padding(attention_mask, cache, batch, length, past)
        if prompts is not None:
            prompts = self._check_prompts(prompts, batch, length)
        return self._run(hidden, position_ids, padding, prompts, cache)

    @torch.no_grad()
    def run_step(self, step: SpanStep, cache: SpanCache) -> torch.Tensor:
        """Compute one session step, checked once already (node/session_machine.py), into ``cache``.

        Nothing a peer sent is checked again here; only our own invariants (the cache is
        this span's, holds ``step.position`` columns and has room), whose failure is a bug.
        """
        self._check_step(step, cache)
        padding = step.mask.to(self.device) if step.mask is not None else None
        prompts = step.prompts.to(device=self.device, dtype=self.dtype) if step.prompts is not None else None
        return self._run(step.hidden, step.positions.to(self.device), padding, prompts, cache)

    def _run(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        padding: torch.Tensor | None,
        prompts: torch.Tensor | None,
        cache: SpanCache | None,
    ) -> torch.Tensor:
        """The computation: ``padding`` bool ``[B, past + T]`` or None, ``prompts`` on the span's device."""
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        kv = cache.cache if cache is not None else None
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=padding,
            position_ids=position_ids,
            **{_MASK_CACHE_KEYWORD: kv},
        )
        position_embeddings = self.rotary(hidden, position_ids)
        for j, layer in enumerate(self.layers):
            if prompts is not None:
                p = prompts.shape[2]
                hidden = torch.cat([hidden[:, :p] + prompts[j], hidden[:, p:]], dim=1)
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=kv is not None,
                position_embeddings=position_embeddings,
                **{self.cache_keyword: kv},
            )
        if cache is not None:
            cache.length += int(hidden.shape[1])
            cache.padding_mask = padding
        return hidden

    @torch.no_grad()
    def inference_step(
        self,
        hidden: torch.Tensor,
        cache: SpanCache,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One inference step: run the new tokens, append their keys/values to ``cache``."""
        return self.forward(hidden, position_ids, attention_mask, prompts, cache=cache)

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of ``sum(forward(hidden) * grad_output)`` w.r.t. ``hidden`` and ``prompts``.

        Stateless: recomputes the forward pass (as petals does), weights frozen.
        """
        with torch.enable_grad():
            x = hidden.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
            p = None
            if prompts is not None:
                p = prompts.detach().to(device=self.device, dtype=self.dtype).requires_grad_(True)
            out = self.forward(x, position_ids, attention_mask, p)
            if grad_output.shape != out.shape:
                raise SpanInputError(f"grad_output shape {list(grad_output.shape)} != output {list(out.shape)}")
            inputs = [x] if p is None else [x, p]
            grads = torch.autograd.grad(out, inputs, grad_outputs=grad_output.to(out.device, out.dtype))
        return grads[0], (grads[1] if p is not None else None)

    # ---------------------------------------------------------------- helpers

    def _check_cache(self, cache: SpanCache, batch: int, length: int) -> None:
        if (cache.start, cache.end) != (self.start, self.end):
            raise SpanInputError(f"cache is for [{cache.start}, {cache.end}), span is [{self.start}, {self.end})")
        if batch != cache.batch_size:
            raise SpanInputError(f"batch {batch} != cache batch {cache.batch_size}")
        if cache.length + length > cache.max_length:
            raise SpanInputError(f"{length} tokens after {cache.length} exceed the cache's max_length {cache.max_length}")

    def _check_step(self, step: SpanStep, cache: SpanCache) -> None:
        """Our invariants for a checked step (a failure is a bug, not a peer's doing)."""
        self._check_cache(cache, step.batch, step.tokens)
        if cache.length != step.position:
            raise SpanInputError(f"internal: a step at column {step.position} for a cache holding {cache.length}")

    def _positions(self, position_ids, batch: int, length: int, past: int) -> torch.Tensor:
        if position_ids is None:
            return torch.arange(past, past + length, device=self.device).unsqueeze(0)
        position_ids = torch.as_tensor(position_ids, device=self.device).long()
        if position_ids.ndim == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.ndim != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch):
            raise SpanInputError(f"position_ids must be [{batch} or 1, {length}], got {list(position_ids.shape)}")
        if int(position_ids.min()) < 0 or int(position_ids.max()) >= self.max_length:
            raise SpanInputError(f"positions must lie in [0, {self.max_length})")
        return position_ids

    def _padding(self, attention_mask, cache: SpanCache | None, batch: int, length: int, past: int):
        """Bool padding mask over all tokens so far [B, past + T], or None if there is none."""
        previous = cache.padding_mask if cache is not None else None
        if attention_mask is None:
            if previous is None:
                return None
            new = torch.ones(batch, length, dtype=torch.bool, device=self.device)
            return torch.cat([previous, new], dim=1)
        mask = torch.as_tensor(attention_mask, device=self.device).bool()
        if mask.ndim != 2 or mask.shape[0] != batch or mask.shape[1] not in (length, past + length):
            raise SpanInputError(
                f"attention_mask must be [{batch}, {length}] or [{batch}, {past + length}], got {list(mask.shape)}"
            )
        if mask.shape[1] == past + length:
            return mask
        if previous is None:
            previous = torch.ones(batch, past, dtype=torch.bool, device=self.device)
        return torch.cat([previous, mask], dim=1)

    def _check_prompts(self, prompts: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        if (
            prompts.ndim != 4
            or prompts.shape[0] != self.n_blocks
            or prompts.shape[1] not in (1, batch)
            or prompts.shape[3] != self.hidden_size
        ):
            raise SpanInputError(
                f"prompts must be [{self.n_blocks}, {batch} or 1, P, {self.hidden_size}], got {list(prompts.shape)}"
            )
        if prompts.shape[2] > length:
            raise SpanInputError(f"{prompts.shape[2]} prompt positions but only {length} tokens")
        return prompts.to(device=self.device, dtype=self.dtype)


# -------------------------------------------------------------------- batched decode


class _BatchedDecodeKV(Cache):
    """Several sessions' caches seen as one batch for a single-token step.

    ``update`` appends row ``i``'s new key/value to session ``i``'s own reserved cache,
    then returns all rows' filled prefixes zero-padded on the right to the longest
    one; the attention mask hides the padding, so each row attends exactly to its own
    session's tokens.
    """

    def __init__(self, caches: list[SpanCache], rows: list[slice], offset: int) -> None:
        super().__init__(layers=[])
        self.caches = caches
        self.rows = rows
        self.offset = offset

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        j = layer_idx - self.offset
        keys, values = [], []
        for cache, rows in zip(self.caches, self.rows):
            k, v = cache.cache.layers[j].update(key_states[rows], value_states[rows])
            keys.append(k)
            values.append(v)
        longest = max(k.shape[2] for k in keys)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(t, (0, 0, 0, longest - t.shape[2]))

        return torch.cat([pad(k) for k in keys]), torch.cat([pad(v) for v in values])


def batched_decode_step(span: BlockSpan, steps: list[SpanStep], caches: list[SpanCache]) -> list[torch.Tensor]:
    """One-token inference steps of several sessions on ``span`` in one batched call.

    ``steps[i]``: a batchable ``SpanStep`` (one real token per row, no prompts) for
    ``caches[i]``. Equivalent to ``span.run_step(steps[i], caches[i])`` for each ``i``
    (same positions, same keys; within float rounding): the weights are read once for
    all rows instead of once per session. On failure some caches may have been
    appended to; the caller rolls them back.
    """
    if len(steps) != len(caches) or not caches:
        raise SpanInputError("need one step per cache")
    rows, masks = [], []
    at = 0
    for step, cache in zip(steps, caches):
        if not step.batchable:
            raise SpanInputError("internal: a batched decode step takes one real token per row and no prompts")
        span._check_step(step, cache)
        b = step.batch
        rows.append(slice(at, at + b))
        at += b
        full = step.mask if step.mask is not None else torch.ones(b, step.position + 1, dtype=torch.bool)
        masks.append(full.to(span.device))
    longest = max(m.shape[1] for m in masks)
    keys = torch.cat([nn.functional.pad(m, (0, longest - m.shape[1])) for m in masks])  # [N, longest]
    hidden = torch.cat([step.hidden for step in steps]).to(device=span.device, dtype=span.dtype)
    position_ids = torch.cat([step.positions.expand(step.batch, 1) for step in steps]).to(span.device)
    mask = keys[:, None, None, :]  # bool [N, 1, 1, keys]: True = attend (sdpa convention)
    if span.config._attn_implementation == "eager":
        mask = torch.zeros(mask.shape, dtype=span.dtype, device=span.device).masked_fill(~mask, torch.finfo(span.dtype).min)
    kv = _BatchedDecodeKV(caches, rows, span.start)
    with torch.no_grad():
        position_embeddings = span.rotary(hidden, position_ids)
        for layer in span.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                position_embeddings=position_embeddings,
                **{span.cache_keyword: kv},
            )
    outs = []
    for step, cache, r in zip(steps, caches, rows):
        cache.length += 1
        cache.padding_mask = step.mask
        outs.append(hidden[r])
    return outs
