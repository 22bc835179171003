"""The bundled SmolLM2-135M-Instruct: GGUF -> safetensors conversion and spans on the real model.

The conversion dequantises 272 tensors (~20 s here); it runs in CI, since the bundled model
is the real-model check of the block code.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from biopetals.models.blocks import BlockSpan
from biopetals.models.client_parts import ClientParts
from biopetals.models.config import model_info
from biopetals.models.smollm2 import gguf_path, smollm2_path
from biopetals.models.transformers_contract import cache_keyword_of

pytestmark = pytest.mark.exactness

QUESTION = [{"role": "user", "content": "What is the function of ribosomes in a cell?"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = tmp_path_factory.mktemp("biopetals-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIOPETALS_CACHE", str(cache))
        path = smollm2_path()
        assert smollm2_path() == path  # second call: cached, no conversion
    assert path == cache / "models" / "SmolLM2-135M-Instruct"
    return path


def test_converted_directory_is_clean_and_sharded(converted):
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    assert not [p for p in converted.parent.iterdir() if ".tmp-" in p.name]
    assert model_info(converted).name == "smollm2-135m-instruct"


def test_converted_generates_same_text_as_gguf(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    ours = AutoModelForCausalLM.from_pretrained(converted).generate(ids, max_new_tokens=32, do_sample=False)
    source = gguf_path()
    gguf = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    assert torch.equal(ours, gguf.generate(ids, max_new_tokens=32, do_sample=False))
    answer = tokenizer.decode(ours[0, ids.shape[1]:], skip_special_tokens=True)
    assert "protein" in answer.lower(), answer


def test_spans_with_cache_match_transformers(converted):
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    head = ClientParts.load(converted)
    assert head.tied
    spans = [BlockSpan.load(converted, 0, 12), BlockSpan.load(converted, 12, 30)]
    caches = [s.allocate_cache(1, 64) for s in spans]
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    ref_cache = DynamicCache(config=model.config)
    worst = 0.0
    with torch.no_grad():
        for _ in range(21):
            ref = model(ids, use_cache=True, output_hidden_states=True, **{cache_keyword_of(model.forward): ref_cache})
            h12 = spans[0].inference_step(head.embed(ids), caches[0])
            logits = head.logits(spans[1].inference_step(h12, caches[1]))
            worst = max(worst, (h12 - ref.hidden_states[12]).abs().max().item(),
                        (logits - ref.logits).abs().max().item())
            ids = ref.logits[:, -1:].argmax(-1)
    assert worst <= 1e-5, worst
