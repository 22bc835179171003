"""Test helpers: tiny random checkpoints, written with transformers' own ``save_pretrained``.

``make_tiny_checkpoint(dir)`` writes a real Hugging Face directory: config.json,
sharded safetensors with ``model.safetensors.index.json`` (small ``max_shard_size``
so there are several shards), generation_config.json and a byte-level BPE
tokenizer trained inline with ``tokenizers``. The default is a Llama-3-style
config: 8 layers, hidden 64, GQA (4 query heads, 2 KV heads) and ``llama3`` rope
scaling.

Use from a test module::

    from support_models import tiny_llama_checkpoint  # session-scoped fixture

or call ``make_tiny_checkpoint(tmp_path / "m", arch="mistral")`` directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CORPUS = [
    "The mitochondria is the powerhouse of the cell.",
    "DNA is transcribed into RNA, which is translated into protein.",
    "Enzymes lower the activation energy of chemical reactions.",
    "A swarm of nodes serves the blocks of a language model.",
    "Ribosomes read messenger RNA three bases at a time.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
] * 4

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def make_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on ``CORPUS`` (at most ``vocab_size`` tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_config(
    arch: str = "llama",
    *,
    num_layers: int = 8,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 320,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 256,
):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=0.05,  # larger than the default so blocks change the residual stream visibly
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if arch == "llama":
        return LlamaConfig(**common, rope_parameters=dict(LLAMA3_ROPE), architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        # sliding window longer than any test sequence: equal to full attention there
        return MistralConfig(**common, sliding_window=128, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    raise ValueError(f"unknown arch {arch!r}")


def make_tiny_checkpoint(
    path: str | Path,
    arch: str = "llama",
    *,
    max_shard_size: str = "100KB",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    **config_kwargs,
) -> Path:
    """Write a random checkpoint with several safetensors shards to ``path``; return ``path``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = make_config(arch, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(path)
    if with_tokenizer:
        make_tokenizer(config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory) -> Path:
    """8-layer Llama-3-style random checkpoint (GQA, llama3 rope scaling, sharded)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama") / "tiny-llama")


def checkpoint_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint directory (through its index), by name."""
    import json

    from safetensors import safe_open

    directory = Path(directory)
    out = {}
    for name, file in json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].items():
        with safe_open(directory / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out
