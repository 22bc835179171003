"""What the client relies on of transformers' ``generate()``, checked instead of assumed.

transformers' generate runs a model through its public contract for caches: a
``Cache`` object given to ``generate()`` is used as is ("user-defined cache") and
handed to every ``forward()`` call under one keyword, which generate also fills
from the model's output. transformers 5.24 renamed that keyword from
``past_key_values`` to ``cache`` (the old name is deprecated, still accepted by
``generate()``). A client that missed the rename once ran every decode step
statelessly on the last token alone and returned wrong text while a plain forward
stayed exact; so everything version-dependent lives here, and anything this
module does not recognise raises ``UnsupportedTransformersError`` instead of
being ignored.

No private generate internals are overridden: the model hands its ``RemoteCache``
to ``generate()`` as a user-defined cache, which every transformers 5.x honours.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from biopetals.models.transformers_contract import CACHE_KEYWORDS, UnsupportedTransformersError, cache_keyword_of

__all__ = [
    "CACHE_KEYWORDS",
    "UnsupportedTransformersError",
    "cache_keyword",
    "check_forward_kwargs",
    "check_generate_options",
    "check_positions",
    "generate_total_length",
    "output_cache_field",
    "speculation_margin",
    "pop_cache",
]

# forward() keywords that generate() or a training loop may pass and that change nothing
# when they have these values; any other value (or keyword) is refused.
_HARMLESS_WHEN = {
    "return_dict": lambda v: v is None or bool(v),
    "output_attentions": lambda v: not v,
    "output_hidden_states": lambda v: not v,
    "output_router_logits": lambda v: not v,
}
# forward() keywords passed on to transformers' loss function.
LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index"})


def cache_keyword() -> str:
    """The keyword under which this transformers' ``generate()`` passes the cache to ``forward()``."""
    return cache_keyword_of(GenerationMixin.prepare_inputs_for_generation)


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache given under any of its names (refusing two different ones)."""
    given = {name: kwargs.pop(name) for name in CACHE_KEYWORDS if name in kwargs}
    values = [v for v in given.values() if v is not None]
    if len(values) > 1 and any(v is not values[0] for v in values[1:]):
        raise ValueError(f"two different caches given ({', '.join(given)}); pass one")
    return values[0] if values else None


def check_forward_kwargs(owner: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Refuse keywords ``owner.forward()`` does not understand; return those meant for the loss."""
    loss_kwargs = {}
    for name, value in kwargs.items():
        if name in LOSS_KWARGS:
            loss_kwargs[name] = value
        elif name in _HARMLESS_WHEN:
            if not _HARMLESS_WHEN[name](value):
                raise NotImplementedError(f"{owner}.forward(): {name}={value!r} is not supported over the swarm")
        else:
            raise UnsupportedTransformersError(
                f"{owner}.forward() got the keyword {name!r}, which this client does not know; it refuses to guess "
                f"what it means (transformers {transformers.__version__}). If a transformers release passes it, "
                "that release is not supported yet: install the versions of constraints.txt"
            )
    return loss_kwargs


def check_positions(name: str, given: torch.Tensor | None, expected: torch.Tensor, valid: torch.Tensor | None) -> None:
    """``given`` positions (``position_ids`` or ``cache_position``) must be the ones the nodes will use.

    The nodes derive positions themselves (spec/messages.md §5.6); a caller asking for
    others would silently get a different computation, so it gets an error instead.
    ``valid`` masks out padding columns, whose positions do not matter.
    """
    if given is None:
        return
    given = given.to(expected.device).long()
    try:
        given, want = torch.broadcast_tensors(given, expected)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(given.shape)} does not fit the inputs {tuple(expected.shape)}") from None
    differs = given != want
    if valid is not None:
        differs &= valid.to(differs.device).bool().expand_as(differs)
    if bool(differs.any()):
        raise ValueError(f"{name} {given.tolist()} differ from the positions the nodes use {want.tolist()} "
                         "(spec/messages.md §5.6); custom positions are not supported over the swarm")


# generate() options this client refuses (a value other than None/False): each would run the model in
# a way the swarm does not (speculative decoding itself, ``assistant_model`` and
# ``prompt_lookup_num_tokens``, is supported: spec/messages.md §5.6.1).
_REFUSED_GENERATE = {
    "assistant_early_exit": "early-exit self-speculation runs the first layers of this model as the draft, and "
                            "those layers live on the nodes",
    "use_mtp": "multi-token prediction heads are not part of a swarm model",
    "assistant_tokenizer": "an assistant with another tokenizer (universal assisted decoding) is not supported; "
                           "use an assistant_model with the same tokenizer, or prompt_lookup_num_tokens",
}


def check_generate_options(model_config: GenerationConfig, generation_config: Any, kwargs: dict[str, Any]) -> None:
    """Refuse the ``generate()`` options this client does not support, instead of running them wrongly."""
    config = generation_config if generation_config is not None else model_config
    for name, why in _REFUSED_GENERATE.items():
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None and value is not False:
            raise NotImplementedError(f"generate({name}=...) is not supported over the swarm: {why}")


def generate_total_length(model_config: GenerationConfig, prompt_length: int, generation_config: Any,
                          kwargs: dict[str, Any]) -> int:
    """The most tokens one ``generate()`` call can put in the cache: prompt plus new tokens.

    Follows ``GenerationConfig``'s documented rule: ``max_new_tokens`` takes precedence
    over ``max_length`` (which counts the prompt). Used to size the session on the nodes.
    """
    config = copy.deepcopy(generation_config if generation_config is not None else model_config)
    if not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a GenerationConfig, not {type(config).__name__}")
    config.update(**{k: v for k, v in kwargs.items() if k in ("max_new_tokens", "max_length")})
    if config.max_new_tokens is not None:
        return prompt_length + int(config.max_new_tokens)
    return max(int(config.max_length), prompt_length + 1)


def speculation_margin(model_config: GenerationConfig, generation_config: Any, kwargs: dict[str, Any]) -> int:
    """Columns a session needs past ``generate_total_length`` for speculative decoding.

    transformers' prompt lookup (``PromptLookupCandidateGenerator``) bounds its candidates by the
    prompt's length and ``max_length``, not by the room left: a verification step may carry up to
    ``prompt_lookup_num_tokens`` columns past ``max_length`` before the rejected ones are cropped. An
    assistant model's candidates stay below ``max_length`` (0 here)."""
    config = generation_config if generation_config is not None else model_config
    k = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    return int(k) if k else 0


def output_cache_field() -> str:
    """The field of ``CausalLMOutputWithPast`` that carries the cache in this transformers."""
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    for name in CACHE_KEYWORDS:
        if name in fields:
            return name
    raise UnsupportedTransformersError(
        f"transformers {transformers.__version__}: CausalLMOutputWithPast has none of the fields {CACHE_KEYWORDS}; "
        "install the versions of constraints.txt")
