"""Unit tests of the transformers contract helpers (no sockets, no model)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from biopetals.client.generation_contract import (check_forward_kwargs, check_generate_options, check_positions,
                                                  generate_total_length, pop_cache, speculation_margin)
from biopetals.models.transformers_contract import UnsupportedTransformersError, cache_keyword_of


def test_cache_keyword_of_reads_the_signature():
    def new(hidden, cache=None, **kwargs): ...
    def old(hidden, past_key_values=None, **kwargs): ...
    def neither(hidden, state=None, **kwargs): ...
    assert cache_keyword_of(new) == "cache"
    assert cache_keyword_of(old) == "past_key_values"
    with pytest.raises(UnsupportedTransformersError, match="none of"):
        cache_keyword_of(neither)


def test_pop_cache_takes_either_name_and_refuses_two_different_caches():
    a, b = object(), object()
    assert pop_cache({"cache": a}) is a
    assert pop_cache({"past_key_values": a, "cache": None}) is a
    assert pop_cache({"past_key_values": a, "cache": a}) is a
    assert pop_cache({}) is None
    kwargs = {"cache": a, "other": 1}
    pop_cache(kwargs)
    assert kwargs == {"other": 1}
    with pytest.raises(ValueError, match="two different caches"):
        pop_cache({"cache": a, "past_key_values": b})


def test_forward_kwargs_unknown_refused_harmless_accepted_loss_passed_on():
    assert check_forward_kwargs("M", {"return_dict": True, "output_attentions": False, "num_items_in_batch": 3}) \
        == {"num_items_in_batch": 3}
    with pytest.raises(UnsupportedTransformersError, match="'block_tables'"):
        check_forward_kwargs("M", {"block_tables": None})
    with pytest.raises(NotImplementedError, match="output_hidden_states=True"):
        check_forward_kwargs("M", {"output_hidden_states": True})


def test_check_positions():
    expected = torch.tensor([[3, 4, 5]])
    check_positions("position_ids", None, expected, None)
    check_positions("position_ids", torch.tensor([3, 4, 5]), expected, None)
    with pytest.raises(ValueError, match="differ"):
        check_positions("position_ids", torch.tensor([[0, 1, 2]]), expected, None)
    # padding columns may hold anything
    check_positions("position_ids", torch.tensor([[1, 0, 1]]), torch.tensor([[0, 0, 1]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(ValueError, match="does not fit"):
        check_positions("cache_position", torch.arange(4), expected, None)


def test_generate_total_length_follows_max_new_tokens_then_max_length():
    model = GenerationConfig(max_length=20)
    assert generate_total_length(model, 7, None, {"max_new_tokens": 5}) == 12
    assert generate_total_length(model, 7, None, {}) == 20
    assert generate_total_length(model, 7, None, {"max_length": 9}) == 9
    assert generate_total_length(model, 30, None, {}) == 31  # prompt longer than max_length
    assert generate_total_length(model, 7, GenerationConfig(max_new_tokens=3), {}) == 10
    assert generate_total_length(model, 7, GenerationConfig(max_new_tokens=3), {"max_new_tokens": 8}) == 15
    assert model.max_new_tokens is None  # the model's config is not modified
    with pytest.raises(TypeError):
        generate_total_length(model, 7, {"max_new_tokens": 3}, {})


def test_speculation_options_refused_and_the_room_prompt_lookup_needs():
    model = GenerationConfig(max_length=20)
    # supported: prompt lookup and an assistant model (spec/messages.md §5.6.1); no error
    check_generate_options(model, None, {"prompt_lookup_num_tokens": 4, "assistant_model": object()})
    for name, value in (("assistant_early_exit", 2), ("use_mtp", True), ("assistant_tokenizer", object())):
        with pytest.raises(NotImplementedError, match=name):
            check_generate_options(model, None, {name: value})
    with pytest.raises(NotImplementedError, match="assistant_early_exit"):
        check_generate_options(model, GenerationConfig(assistant_early_exit=2), {})
    assert speculation_margin(model, None, {}) == 0
    assert speculation_margin(model, None, {"prompt_lookup_num_tokens": 8}) == 8
    assert speculation_margin(model, GenerationConfig(prompt_lookup_num_tokens=3), {}) == 3
