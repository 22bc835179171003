"""Checkpoint reading, config checks and the swarm naming rule, on real safetensors files."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from biopetals.models.blocks import BlockSpan
from biopetals.models.checkpoint import CheckpointIndex, load_block_state, load_client_parts
from biopetals.models.client_parts import ClientParts
from biopetals.models.config import (
    ModelConfigError,
    config_fingerprint,
    load_config,
    model_info,
    normalize_model_name,
    resolve_checkpoint,
)
from support_models import make_tiny_checkpoint, tiny_llama_checkpoint  # noqa: F401 (fixture)


def test_checkpoint_is_sharded_with_gqa_and_llama3_rope(tiny_llama_checkpoint):
    index = json.loads((tiny_llama_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    config, _ = load_config(tiny_llama_checkpoint)
    assert config.num_key_value_heads < config.num_attention_heads
    assert config.rope_parameters["rope_type"] == "llama3"


def test_block_state_reads_only_that_block(tiny_llama_checkpoint):
    index = CheckpointIndex(tiny_llama_checkpoint)
    state = load_block_state(tiny_llama_checkpoint, 3, index=index)
    assert index.reads and all(name.startswith("model.layers.3.") for name in index.reads)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_checkpoint).model.layers[3].state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)


def test_span_load_reads_only_its_blocks(tiny_llama_checkpoint):
    index = CheckpointIndex(tiny_llama_checkpoint)
    BlockSpan.load(tiny_llama_checkpoint, 2, 4, index=index)
    assert {name.split(".")[2] for name in index.reads} == {"2", "3"}
    assert len(index.reads) == 2 * 9  # q k v o, gate up down, two norms


def test_client_parts_read_no_block(tiny_llama_checkpoint):
    index = CheckpointIndex(tiny_llama_checkpoint)
    parts = load_client_parts(tiny_llama_checkpoint, index=index)
    assert sorted(index.reads) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]
    assert parts["lm_head"] is not parts["embed_tokens"]


def test_tied_embeddings_single_file(tmp_path):
    path = make_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True, max_shard_size="1GB")
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    index = CheckpointIndex(path)
    assert "lm_head.weight" not in index  # transformers does not save a tied head
    parts = ClientParts.load(path, index=index)
    assert parts.tied and "lm_head.weight" not in index.reads
    ids = torch.tensor([[5, 6, 7, 8]])
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = parts.logits(BlockSpan.load(path, 0, 8)(parts.embed(ids)))
        assert (logits - model(ids).logits).abs().max() <= 1e-5
    assert parts.nbytes() == 4 * (320 * 64 + 64)


def test_unsupported_architecture_lists_supported(tmp_path):
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(ModelConfigError) as err:
        load_config(tmp_path)
    assert "GPT2LMHeadModel" in str(err.value)
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in str(err.value)


def test_missing_checkpoints(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(ModelConfigError, match="not in the local Hugging Face cache"):
        resolve_checkpoint("nobody/not-cached")
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelConfigError, match="no config.json"):
        resolve_checkpoint(tmp_path / "d")
    with pytest.raises(ModelConfigError, match="block span"):
        BlockSpan.load(make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False), 6, 9)


def test_hub_cache_lookup_and_naming(tiny_llama_checkpoint, tmp_path, monkeypatch):
    """A hub name resolves offline from the standard cache layout; name = repo id, normalised."""
    hub = tmp_path / "hub"
    repo = hub / "models--bio-lab--Tiny-Llama.v2"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama_checkpoint, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert resolve_checkpoint("bio-lab/Tiny-Llama.v2") == snapshot.resolve()
    by_name = model_info("bio-lab/Tiny-Llama.v2")
    by_path = model_info(snapshot)
    assert by_name == by_path
    assert by_name.name == "bio-lab-tiny-llama.v2"
    assert by_name.dht_prefix == f"bio-lab-tiny-llama.v2.{by_name.fingerprint[:8]}"
    assert BlockSpan.load("bio-lab/Tiny-Llama.v2", 0, 1).n_blocks == 1

    plain = model_info(tiny_llama_checkpoint)  # a plain directory: its name
    assert plain.name == "tiny-llama" and plain.fingerprint == by_name.fingerprint


def test_fingerprint_separates_shapes(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a" / "model", with_tokenizer=False)
    b = make_tiny_checkpoint(tmp_path / "b" / "model", with_tokenizer=False, num_layers=4)
    info_a, info_b = model_info(a), model_info(b)
    assert info_a.name == info_b.name == "model"
    assert info_a.dht_prefix != info_b.dht_prefix
    assert config_fingerprint(load_config(a)[0]) == info_a.fingerprint


@pytest.mark.parametrize(
    "raw, name",
    [("HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb-smollm2-135m-instruct"),
     ("My Model (v2)", "my-model-v2"), ("a//b", "a-b")],
)
def test_normalize_model_name(raw, name):
    assert normalize_model_name(raw) == name


def test_normalize_rejects_empty():
    with pytest.raises(ModelConfigError):
        normalize_model_name("///")
