"""The mission's model at its own width, scaled down: two real nodes, one Llama-3-8B-wide block each.

Llama-3-8B's width and attention (hidden 4096, 32 query / 8 key-value heads, rope_theta
500000), 2 layers, a small vocabulary and a small MLP (so it runs on a laptop CPU), random
weights written in bf16 in several safetensors shards like the real checkpoint, served
fp32 by two ``biopetals-node`` processes. Checked against transformers' own model of the
same directory (fp32; activations travel as f32):

* per block: the output of each node's block equals transformers' decoder layer (through
  ``Forward`` calls, spec/messages.md §6.1);
* (slow) a 4200-token prompt, which is over ``MAX_TENSOR_ELEMENTS`` at this width (issue 22:
  it failed with LIMIT_EXCEEDED), is sent as a chunked prefill of 4096 + 104 tokens under
  the spec's own limits (client/chunking.py) and gives transformers' greedy tokens.
"""

from __future__ import annotations

import pytest
import torch
from support_models import make_tiny_checkpoint
from transformers import AutoModelForCausalLM

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm
from biopetals.client.remote_forward import forward_all
from biopetals.protocol.limits import MAX_TENSOR_ELEMENTS

pytestmark = [pytest.mark.timeout(900), pytest.mark.exactness]

HIDDEN = 4096
PROMPT = 4200


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("8b-width") / "llama3-8b-width", num_layers=2,
                                hidden_size=HIDDEN, intermediate_size=512, num_heads=32, num_kv_heads=8,
                                vocab_size=320, max_position_embeddings=8192, dtype=torch.bfloat16,
                                max_shard_size="40MB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def setup(checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert reference.config.rope_parameters["rope_theta"] == 500000.0
    with LocalSwarm(checkpoint, [(0, 1), (1, 2)], extra_args=["--max-session-tokens", "8192"]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32",
            step_timeout=300.0, forward_timeout=300.0)
        try:
            yield model, reference
        finally:
            model.close()


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_each_nodes_block_equals_transformers_decoder_layer(setup):
    model, reference = setup
    ids = torch.randint(4, 320, (1, 256), generator=torch.Generator().manual_seed(4))
    emb = model.model.embed_tokens(ids).detach()
    out, trace = model.swarm.loop.run(forward_all(model.swarm, emb))
    assert [(r.start, r.end) for r, _ in trace] == [(0, 1), (1, 2)]
    with torch.no_grad():
        ref = reference(ids, output_hidden_states=True).hidden_states
    assert close(trace[1][1], ref[1]) <= 1e-4  # block 0's output: the input of the node serving block 1
    assert close(reference.model.norm(out), ref[2]) <= 1e-4  # block 1 (transformers' last state is normed)


@pytest.mark.slow  # ~90 s on 2 busy cores: a 4200-token prefill at width 4096, twice (swarm and reference)
def test_a_prompt_over_max_tensor_elements_at_this_width_is_prefilled_in_chunks(setup):
    model, reference = setup
    assert PROMPT * HIDDEN > MAX_TENSOR_ELEMENTS  # one message could not carry it
    ids = torch.randint(4, 320, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    kwargs = dict(max_new_tokens=2, min_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with model.inference_session(max_length=PROMPT + 2) as session:
        ours = model.generate(ids, **kwargs)
        fed = [int(f.hidden.shape[1]) for f in session.chains[0].spans[0].history]
    with torch.no_grad():
        ref = reference.generate(ids, **kwargs)
    assert fed == [4096, PROMPT - 4096, 1]
    assert torch.equal(ours.sequences, ref.sequences)
    assert max(close(a, b) for a, b in zip(ours.logits, ref.logits)) <= 1e-4
