"""SmolLM2-135M-Instruct over real node processes equals transformers' own, with a node killed mid-generation.

One swarm, one generation: 64 greedy tokens and their logits equal transformers', the first half
through the first route, the second after a failover with replay (one test instead of two: the
failover rules are tested with a fake clock in tests/test_client_chain.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm

from biopetals.models.smollm2 import smollm2_path

pytestmark = [pytest.mark.timeout(900), pytest.mark.exactness]

NEW_TOKENS = 64
KWARGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
              output_logits=True)


@pytest.fixture(scope="module")
def smollm2():
    """(path, prompt ids, transformers' own greedy output with logits) for the bundled model."""
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What do ribosomes do?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().generate(ids, **KWARGS)
    return path, ids, ref


def assert_same_as_reference(ours, ref):
    assert torch.equal(ours.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff <= 1e-4, diff


def test_smollm2_survives_a_node_killed_mid_generation(smollm2):
    """kill -9 the node serving blocks 15:30 after 32 tokens; a spare takes over, same tokens and logits."""
    path, ids, ref = smollm2
    with LocalSwarm(path, [(0, 15), (15, 30), (15, 30)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                swarm_key=swarm.key_path, codec="f32")
        killed = []

        class KillMidway(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if input_ids.shape[1] == ids.shape[1] + NEW_TOKENS // 2 and not killed:
                    peer = next(p for p, start, _ in model.active_session.route[0] if start == 15)
                    next(n for n in swarm.nodes if n.peer_id == peer).kill()
                    killed.append(peer)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        try:
            with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
                ours = model.generate(ids, **KWARGS, stopping_criteria=StoppingCriteriaList([KillMidway()]))
                assert session.failovers == 1
                route = session.route[0]
        finally:
            model.close()
    assert killed and killed[0] not in [p for p, _, _ in route]
    assert_same_as_reference(ours, ref)
