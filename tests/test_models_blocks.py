"""BlockSpan and ClientParts against transformers' own model on the same checkpoint.

Reference everywhere: ``AutoModelForCausalLM.from_pretrained`` of the same tiny
random checkpoint (real sharded safetensors written by ``save_pretrained``).
``output_hidden_states[k]`` is the input of block k (the last entry is after the
final norm, so the end of the model is compared through the logits).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from biopetals.models.blocks import BlockSpan, SpanInputError, kv_cache_bytes
from biopetals.models.client_parts import ClientParts
from biopetals.models.transformers_contract import cache_keyword_of
from support_models import make_tiny_checkpoint

pytestmark = pytest.mark.exactness

N_LAYERS = 8
TOL = 1e-5


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}", request.param)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("llama") / "tiny-llama")


def reference(path, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_kv_cache_prefill_and_20_decode_steps_match_reference(checkpoint):
    """Spans [0,3) + [3,8) with KV caches, prefill 12 tokens then 20 greedy decode steps."""
    model = reference(checkpoint)
    head = ClientParts.load(checkpoint)
    spans = [BlockSpan.load(checkpoint, 0, 3), BlockSpan.load(checkpoint, 3, N_LAYERS)]
    caches = [s.allocate_cache(batch_size=1, max_length=40) for s in spans]
    ref_cache = DynamicCache(config=model.config)
    ids = torch.randint(4, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        for step in range(21):
            ref = model(ids, use_cache=True, output_hidden_states=True, **{cache_keyword_of(model.forward): ref_cache})
            h0 = head.embed(ids)
            h3 = spans[0].inference_step(h0, caches[0])
            h8 = spans[1].inference_step(h3, caches[1])
            logits = head.logits(h8)
            worst = max(worst, max_diff(h3, ref.hidden_states[3]), max_diff(logits, ref.logits))
            ids = ref.logits[:, -1:].argmax(-1)
    assert caches[0].length == caches[1].length == 32
    assert worst <= TOL, worst


def test_chained_spans_give_whole_model_logits(llama_checkpoint):
    model = reference(llama_checkpoint)
    head = ClientParts.load(llama_checkpoint)
    whole = BlockSpan.load(llama_checkpoint, 0, N_LAYERS)
    ids = torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
        x = head.embed(ids)
        assert max_diff(head.logits(whole(x)), ref.logits) <= TOL
        for k in (1, 4, 7):
            first, second = whole.sub(0, k), BlockSpan.load(llama_checkpoint, k, N_LAYERS)
            mid = first(x)
            assert max_diff(mid, ref.hidden_states[k]) <= TOL
            assert max_diff(head.logits(second(mid)), ref.logits) <= TOL


def test_backward_gives_reference_input_gradients(llama_checkpoint):
    model = reference(llama_checkpoint)
    head = ClientParts.load(llama_checkpoint)
    a, b = BlockSpan.load(llama_checkpoint, 0, 5), BlockSpan.load(llama_checkpoint, 5, N_LAYERS)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 64, generator=gen)
    weights = torch.randn(2, 9, model.config.vocab_size, generator=gen)

    x_ref = x.clone().requires_grad_(True)
    (model(inputs_embeds=x_ref).logits * weights).sum().backward()

    # plain autograd through the stateless forward
    x_ours = x.clone().requires_grad_(True)
    (head.logits(b(a(x_ours))) * weights).sum().backward()
    assert max_diff(x_ours.grad, x_ref.grad) <= TOL

    # the node's way: span by span, output gradients in, input gradients out
    with torch.no_grad():
        h5 = a(x)
        h8 = b(h5).requires_grad_(True)
    (head.logits(h8) * weights).sum().backward()
    g5, none = b.backward(h5, h8.grad)
    gx, _ = a.backward(x, g5)
    assert none is None
    assert max_diff(gx, x_ref.grad) <= TOL, max_diff(gx, x_ref.grad)


def _add_prompt_hooks(model, prompts):
    """Reference deep prompts: before layer j, add prompts[j] to the first P positions."""
    handles = []
    for j, layer in enumerate(model.model.layers):

        def hook(module, args, kwargs, j=j):
            h = args[0]
            p = prompts.shape[2]
            return (torch.cat([h[:, :p] + prompts[j], h[:, p:]], dim=1), *args[1:]), kwargs

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def test_deep_prompts_forward_backward_and_cached(llama_checkpoint):
    model = reference(llama_checkpoint)
    head = ClientParts.load(llama_checkpoint)
    span = BlockSpan.load(llama_checkpoint, 0, N_LAYERS)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 64, generator=gen)
    prompts = torch.randn(N_LAYERS, 1, 3, 64, generator=gen) * 0.5
    weights = torch.randn(2, 7, model.config.vocab_size, generator=gen)

    x_ref, p_ref = x.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    handles = _add_prompt_hooks(model, p_ref)
    ref_logits = model(inputs_embeds=x_ref).logits
    (ref_logits * weights).sum().backward()
    for h in handles:
        h.remove()

    out = span(x, prompts=prompts)
    assert max_diff(head.logits(out), ref_logits) <= TOL
    h8 = out.detach().requires_grad_(True)
    (head.logits(h8) * weights).sum().backward()
    gx, gp = span.backward(x, h8.grad, prompts=prompts)
    assert max_diff(gx, x_ref.grad) <= TOL
    assert gp.shape == prompts.shape and max_diff(gp, p_ref.grad) <= TOL

    # inference: prompts go with the call at position 0; later steps carry none
    cache = span.allocate_cache(2, 16)
    first = span.inference_step(x[:, :5], cache, prompts=prompts)
    rest = span.inference_step(x[:, 5:], cache)
    assert max_diff(torch.cat([first, rest], 1), out) <= TOL


def test_left_padded_batch_with_cache_matches_reference(llama_checkpoint):
    model = reference(llama_checkpoint)
    head = ClientParts.load(llama_checkpoint)
    span = BlockSpan.load(llama_checkpoint, 0, N_LAYERS)
    pad = 3
    ids = torch.tensor([[pad, pad, pad, 40, 41, 42, 43], [50, 51, 52, 53, 54, 55, 56]])
    mask = (ids != pad).long()
    cache = span.allocate_cache(2, 20)
    ref_cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    with torch.no_grad():
        for step in range(6):
            ref = model(ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_keyword_of(model.forward): ref_cache})
            new_mask = mask[:, -ids.shape[1]:]
            out = span.inference_step(head.embed(ids), cache, position_ids=positions, attention_mask=new_mask)
            logits = head.logits(out)
            assert torch.isfinite(out).all()  # padded rows must not poison the wire with NaN
            assert max_diff(logits[real], ref.logits[real]) <= TOL
            ids = ref.logits[:, -1:].argmax(-1)
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            real = torch.ones(2, 1, dtype=torch.bool)
    assert cache.padding_mask.shape == (2, 12)


def test_bfloat16_matches_transformers_bfloat16(llama_checkpoint, capsys):
    ref32, ref16 = reference(llama_checkpoint), reference(llama_checkpoint, torch.bfloat16)
    span = BlockSpan.load(llama_checkpoint, 0, N_LAYERS, dtype="bfloat16")
    head = ClientParts.load(llama_checkpoint, dtype="bfloat16")
    ids = torch.randint(4, 300, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = head.logits(span(head.embed(ids)))
        same_dtype = max_diff(logits, ref16(ids).logits)
        vs_fp32 = max_diff(logits, ref32(ids).logits)
    with capsys.disabled():
        print(f"\nbf16 span vs transformers bf16: {same_dtype:.3g}; vs fp32: {vs_fp32:.3g}")
    assert span.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert same_dtype <= 1e-2
    assert vs_fp32 <= 0.1


def test_cache_reservation_and_limits(llama_checkpoint):
    span = BlockSpan.load(llama_checkpoint, 2, 6)
    cfg = span.config
    per_token = 2 * 4 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert span.cache_bytes_per_token() == per_token
    assert kv_cache_bytes(cfg, 4, torch.bfloat16, batch_size=3, tokens=10) == per_token // 2 * 30
    cache = span.allocate_cache(batch_size=3, max_length=10)
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.cache.layers)
    assert cache.nbytes == held == per_token * 30  # reserved up front, before any token
    with torch.no_grad():
        span.inference_step(torch.zeros(3, 8, 64), cache)
        assert cache.tokens_left == 2
        with pytest.raises(SpanInputError, match="exceed"):
            span.inference_step(torch.zeros(3, 3, 64), cache)
        with pytest.raises(SpanInputError, match="hidden states"):
            span.inference_step(torch.zeros(3, 1, 65), cache)
        with pytest.raises(SpanInputError, match="batch"):
            span.inference_step(torch.zeros(2, 1, 64), cache)
        with pytest.raises(SpanInputError, match="cache is for"):
            span.sub(2, 4).inference_step(torch.zeros(3, 1, 64), cache)
    with pytest.raises(SpanInputError, match="max_length"):
        span.allocate_cache(1, cfg.max_position_embeddings + 1)


def test_sliding_window_caps_max_length(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "mistral", "mistral", with_tokenizer=False)
    span = BlockSpan.load(path, 0, 2)
    assert span.max_length == 128  # the window: beyond it sliding attention differs from causal
    with pytest.raises(SpanInputError, match="max_length"):
        span.allocate_cache(1, 129)


def test_bad_inputs_are_refused(llama_checkpoint):
    span = BlockSpan.load(llama_checkpoint, 0, 2)
    x = torch.zeros(1, 4, 64)
    with pytest.raises(SpanInputError, match="prompt positions"):
        span(x, prompts=torch.zeros(2, 1, 5, 64))
    with pytest.raises(SpanInputError, match="prompts must be"):
        span(x, prompts=torch.zeros(3, 1, 2, 64))
    with pytest.raises(SpanInputError, match="positions must lie"):
        span(x, position_ids=torch.tensor([0, 1, 2, 256]))
    with pytest.raises(SpanInputError, match="position_ids must be"):
        span(x, position_ids=torch.arange(3))
    with pytest.raises(SpanInputError, match="attention_mask"):
        span(x, attention_mask=torch.ones(1, 3))
    with pytest.raises(SpanInputError, match="grad_output"):
        span.backward(x, torch.zeros(1, 3, 64))


def test_random_block_has_the_shape_and_speed_path_of_a_real_one(llama_checkpoint):
    """BlockSpan.random: what a node measures with before it holds any block (node/server.py)."""
    real, fake = BlockSpan.load(llama_checkpoint, 0, 1), BlockSpan.random(llama_checkpoint)
    assert (fake.start, fake.end, fake.hidden_size) == (0, 1, real.hidden_size)
    assert {k: v.shape for k, v in fake.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
    hidden = torch.randn(1, 4, real.hidden_size)
    out = fake.forward(hidden)
    assert out.shape == hidden.shape and torch.isfinite(out).all()
    assert not torch.equal(out, real.forward(hidden))  # random weights, not the checkpoint's
