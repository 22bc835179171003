"""The client's contract with transformers' generate(): the cache is never dropped silently.

transformers 5.24 renamed generate's cache keyword (``past_key_values`` -> ``cache``);
a client that missed it ran every decode step statelessly and returned wrong text.
These tests run real node processes on loopback and check, from the nodes' side, that
a cached generate() sends one token per decode step, and that forward() refuses what
it does not understand instead of computing without its cache.
"""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch
from support_models import make_tiny_checkpoint
from support_swarm import RawClient
from support_two_nodes import f32_client, swarm  # noqa: F401 (``swarm`` is a fixture)
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from biopetals.client import RemoteCache, UnsupportedTransformersError
from biopetals.models.transformers_contract import cache_keyword_of
from biopetals.protocol.messages import NodeInfoRequest
from biopetals.transport.keyfiles import load_swarm_key

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("contract") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint, swarm):
    m = f32_client(checkpoint, swarm, step_timeout=30.0)
    yield m
    m.close()


@pytest.fixture
def ids(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)("The mitochondria is the powerhouse", return_tensors="pt").input_ids


def decode_steps(swarm) -> list[int]:
    """Each node's count of single-token decode steps, read over the network (NodeInfo)."""
    async def go():
        async with RawClient(load_swarm_key(swarm.key_path)) as client:
            return [(await client.request(node.addr, NodeInfoRequest())).decode_steps for node in swarm.nodes]
    return asyncio.run(go())


def test_cached_generate_sends_one_token_per_decode_step(model, reference, swarm, ids):
    """16 new tokens: the prompt once, then 15 single-token steps on every node; the session advances."""
    before = decode_steps(swarm)
    with model.inference_session(max_length=ids.shape[1] + 16) as session:
        ours = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert session.position == ids.shape[1] + 15
    after = decode_steps(swarm)
    assert [b - a for a, b in zip(before, after)] == [15, 15]
    assert torch.equal(ours, reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False))


def test_generate_refuses_to_decode_without_its_cache(model, ids, monkeypatch):
    """A transformers that loses the cache on its way to forward() gets an error, not stateless decoding."""
    prepare = type(model).prepare_inputs_for_generation

    @functools.wraps(prepare)
    def dropping_the_cache(self, *args, **kwargs):
        inputs = prepare(self, *args, **kwargs)
        for name in ("cache", "past_key_values"):
            inputs.pop(name, None)
        return inputs

    monkeypatch.setattr(type(model), "prepare_inputs_for_generation", dropping_the_cache)
    with pytest.raises(UnsupportedTransformersError, match="without the RemoteCache"):
        model.generate(ids, max_new_tokens=4, do_sample=False)
    assert model.active_session is None


def test_forward_takes_the_cache_under_old_and_new_names(model, reference, ids):
    """Prefill under ``cache=``, a decode step under ``past_key_values=``: the logits of transformers."""
    nxt = torch.tensor([[7]])
    ref = reference(torch.cat([ids, nxt], 1)).logits
    with model.inference_session(max_length=ids.shape[1] + 1) as session:
        first = model(ids, cache=RemoteCache(session)).logits
        cache = RemoteCache(session)
        cache.base = 0  # the same session, counted from its start
        second = model(nxt, past_key_values=cache).logits
    assert (first - ref[:, :-1]).abs().max().item() <= 1e-4
    assert (second - ref[:, -1:]).abs().max().item() <= 1e-4


def test_forward_refuses_what_it_does_not_understand(model, ids):
    with pytest.raises(UnsupportedTransformersError, match="'cache_implementation_v2'"):
        model(ids, cache_implementation_v2="paged")
    with pytest.raises(TypeError, match="RemoteCache, not DynamicCache"):
        model(ids, cache=DynamicCache())
    with pytest.raises(TypeError, match="RemoteCache, not DynamicCache"):
        model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=2)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0) + 3)
    with model.inference_session(max_length=ids.shape[1]) as session:
        with pytest.raises(ValueError, match="two different caches"):
            model(ids, cache=RemoteCache(session), past_key_values=RemoteCache(session))
        with pytest.raises(ValueError, match="cache_position"):
            model(ids, cache=RemoteCache(session), cache_position=torch.arange(ids.shape[1]) + 1)
        assert session.position == 0  # nothing was sent
    # positions that are the nodes' own are accepted
    out = model(ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), return_dict=True, output_attentions=False)
    assert out.logits.shape[1] == ids.shape[1]


def test_reference_models_take_the_cache_name_we_pass():
    """The node runs transformers' decoder layers with the keyword their signature declares."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from biopetals.client.generation_contract import cache_keyword
    import transformers
    names = {cache_keyword_of(LlamaDecoderLayer.forward), cache_keyword_of(create_causal_mask), cache_keyword()}
    assert len(names) == 1, names
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    assert names == ({"cache"} if (major, minor) >= (5, 24) else {"past_key_values"})
