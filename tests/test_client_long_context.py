"""Context beyond 8192 tokens on real node processes: a Llama-3.1-style (``llama3`` rope scaling) checkpoint.

A tiny random checkpoint (hidden 64, 2 layers, GQA) with 16384 positions and Llama-3.1's
rope scaling (``rope_type: llama3``, factor 8 over 8192 original positions), served by two
``biopetals-node`` processes whose per-session cache budget admits the session
(``--max-session-tokens``). A prompt longer than 8192 tokens gets the same greedy tokens
as transformers' own model (f32 activations, logits within 1e-4); a session longer than
the model's positions is refused before anything is sent. MAX_SEQUENCE_LENGTH is
spec/tensors.md §2 (revision 2: Llama-3.1's 131072). The prefill step is over the nodes'
``--compute-slice-tokens`` (1000 here), so both nodes (the first given the ``Step``, the second
the ``Push``) compute it in 9 column chunks over the session's cache (node/slices.py), the last
one shorter: this is the real-swarm check that chunked prefills give transformers' tokens.
"""

from __future__ import annotations

import time

import pytest
import torch
from support_models import LLAMA3_ROPE, make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.errors import RequestError
from biopetals.client.local_swarm import LocalSwarm

pytestmark = [pytest.mark.timeout(600), pytest.mark.exactness]

POSITIONS = 16384
PROMPT = 8300  # over Llama-3's 8192
NEW = 4
SLICE = 1000  # the nodes compute the prefill in 9 chunks (node/slices.py)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("long") / "tiny-llama31", num_layers=2,
                                max_position_embeddings=POSITIONS)
    config = LlamaConfig.from_pretrained(path)
    assert config.rope_parameters["rope_type"] == "llama3" and LLAMA3_ROPE["rope_type"] == "llama3"
    config.rope_parameters = {**LLAMA3_ROPE, "original_max_position_embeddings": 8192}
    config.save_pretrained(path)
    return path


def test_a_prompt_beyond_8192_tokens_equals_transformers_and_an_over_long_session_is_refused(checkpoint):
    ids = torch.randint(4, 320, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference.generate(ids, **kwargs)
    with LocalSwarm(checkpoint, [(0, 1), (1, 2)], extra_args=["--max-session-tokens", str(POSITIONS),
                                                                  "--compute-slice-tokens", str(SLICE)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", step_timeout=120.0)
        try:
            ours = model.generate(ids, **kwargs)
            assert torch.equal(ours.sequences, ref.sequences)
            assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= 1e-4
            t = time.monotonic()
            with pytest.raises(RequestError, match=f"refused before sending.*the model has {POSITIONS} positions"):
                with model.inference_session(max_length=POSITIONS + 1):
                    model.generate(ids[:, :8], max_new_tokens=1)
            assert time.monotonic() - t < 10
            assert [model.swarm.health.failures(n.peer_id) for n in swarm.nodes] == [0, 0]
        finally:
            model.close()
