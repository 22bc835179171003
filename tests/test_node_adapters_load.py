"""Loading server-side LoRA adapters (node/adapters.py) without sockets: what is loaded, what is refused.

The adapters are written by peft's own ``save_pretrained``; the blocks are a
``BlockSpan`` of a tiny checkpoint. A node loads only its blocks' tensors, and refuses
at start-up what it cannot apply exactly, with a message saying why.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from support_models import make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from biopetals.models.blocks import BlockSpan
from biopetals.node.adapters import AdapterError, AdapterSet, LoraLinear, parse_adapter_arg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_tokenizer=False)


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    path = tmp_path_factory.mktemp("lora")
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj", "lm_head"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(path)
    return path


def span(checkpoint, start=5, end=8):
    return BlockSpan.load(checkpoint, start, end)


def load(adapters, s, path, name="bio"):
    return adapters.load(name, path, s.layers, s.start, s.dtype, s.device)


def test_only_the_served_blocks_are_adapted(checkpoint, adapter):
    s, adapters = span(checkpoint), AdapterSet()
    assert load(adapters, s, adapter) == 2 * 2 * 3  # A and B, 2 modules, blocks 5, 6, 7 (lm_head is the client's)
    assert adapters.names == ("bio",)
    wrapped = [n for n, m in s.named_modules() if isinstance(m, LoraLinear)]
    assert sorted(wrapped) == sorted(f"layers.{j}.{m}" for j in range(3) for m in ("self_attn.q_proj", "mlp.down_proj"))
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        base = s(x)
        with adapters.use("bio"):
            adapted = s(x)
        again = s(x)
    assert (adapted - base).abs().max() > 1e-3 and torch.equal(base, again)  # inactive: exactly the base model
    with pytest.raises(AdapterError, match="twice"):
        load(adapters, s, adapter)
    with pytest.raises(AdapterError, match="not loaded"):
        with adapters.use("nope"):
            pass


def rewrite(adapter, tmp_path, config_changes=None, tensors=None):
    """A copy of ``adapter`` in ``tmp_path`` with its config or tensors changed."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(config_changes or {})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(adapter / "adapter_model.safetensors")
    save_file(tensors(weights) if tensors else weights, tmp_path / "adapter_model.safetensors")
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "use_dora"),
    ({"bias": "all"}, "bias"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "only LORA"),
    ({"r": 0}, "r=0"),
])
def test_unsupported_configs_are_refused(checkpoint, adapter, tmp_path, changes, message):
    with pytest.raises(AdapterError, match=message):
        load(AdapterSet(), span(checkpoint), rewrite(adapter, tmp_path, changes))


def test_bad_tensors_and_files_are_refused(checkpoint, adapter, tmp_path):
    s = span(checkpoint)

    def shrink(weights):
        key = next(k for k in weights if "layers.6.self_attn.q_proj.lora_B" in k)
        return {**weights, key: weights[key][:10]}

    def only_a(weights):
        return {k: v for k, v in weights.items() if "lora_B" not in k}

    def other_blocks(weights):
        return {k: v for k, v in weights.items() if not any(f"layers.{i}." in k for i in (5, 6, 7))}

    for name, tensors, message in (("a", shrink, "do not fit"), ("b", only_a, "both"),
                                   ("c", other_blocks, "no LoRA tensors for blocks 5:8")):
        with pytest.raises(AdapterError, match=message):
            load(AdapterSet(), s, rewrite(adapter, tmp_path / name, tensors=tensors))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load(AdapterSet(), s, tmp_path / "missing")
    for text in ("bio", "=x", "bio="):
        with pytest.raises(AdapterError, match="NAME=PATH"):
            parse_adapter_arg(text)


def test_batched_decode_never_mixes_adapters(checkpoint, adapter):
    """Decode steps of sessions with different adapters queue together but run apart; the same
    adapter batches. Each result equals the session's own step run alone."""
    import asyncio
    import time

    from biopetals.models.step import span_step
    from biopetals.node.backend import Backend

    s, adapters = span(checkpoint, 0, 8), AdapterSet()
    load(adapters, s, adapter)
    backend = Backend(s, adapters=adapters)
    torch.manual_seed(0)
    prefill, step = torch.randn(1, 3, 64), torch.randn(1, 1, 64)
    plan = ["bio", None, "bio", None]

    def alone(name):
        cache = s.allocate_cache(1, 8)
        backend.step(s, cache, span_step(prefill, cache.length), "f32", name)
        return backend.step(s, cache, span_step(step, cache.length), "f32", name)

    expected = [alone(name) for name in plan]
    caches = [s.allocate_cache(1, 8) for _ in plan]
    for cache, name in zip(caches, plan):
        backend.step(s, cache, span_step(prefill, cache.length), "f32", name)

    async def together():
        busy = asyncio.ensure_future(backend.run(time.sleep, 0.5))  # the worker is busy: all four steps queue
        await asyncio.sleep(0.1)
        outs = await asyncio.gather(*(backend.run_step(s, c, span_step(step, c.length), "f32", name)
                                      for c, name in zip(caches, plan)))
        await busy
        return outs

    try:
        outs = asyncio.run(together())
    finally:
        backend.shutdown()
    for name, out, want in zip(plan, outs, expected):
        assert (out - want).abs().max().item() <= 1e-5, name
    assert backend.stats.batched_calls == 2 and backend.stats.largest_batch == 2  # bio+bio, base+base
