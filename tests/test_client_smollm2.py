"""SmolLM2-135M-Instruct over 3 real node processes equals transformers' own (slow: about a minute or more)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_smollm2_greedy_64_tokens_equal_transformers():
    from biopetals.models.smollm2 import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What do ribosomes do?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    kwargs = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().generate(ids, **kwargs)
    with LocalSwarm(path, [(0, 10), (10, 20), (20, 30)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                swarm_key=swarm.key_path, codec="f32")
        try:
            ours = model.generate(ids, **kwargs)
        finally:
            model.close()
    assert torch.equal(ours.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff <= 1e-4, diff
