"""Every invalid answer is a node failure, never an abort (issue 20 item 3), on real node processes.

A node that announces 10^9 tokens/s (so that the route chooses it) and answers wrongly
(tests/broken_node.py, with ``fast-liar``) serves blocks 4:8 beside an honest node: every
``StepResult`` one hidden unit short, or with a NaN, or followed by a result for a step
nobody asked for. A greedy ``generate()`` routed through it treats its first wrong
answer as that node's failure (spec/messages.md §2.6, §5.5, §7.3): it avoids it,
replays onto the honest node and its tokens equal transformers' on the same checkpoint. The rule itself is tested without processes in tests/test_client_chain.py.
"""

from __future__ import annotations

import time

import pytest
import support_swarm
import torch
from support_models import make_tiny_checkpoint
from support_swarm import Swarm
from test_chain_binding import prompt_ids
from test_conformance import BROKEN_NODE
from transformers import AutoModelForCausalLM

from biopetals.client import AutoDistributedModelForCausalLM

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

HONEST = ("--no-benchmark",)


# One mode runs by default; the others take the same driver path (their rules are fake-clock tests in
# tests/test_client_chain.py) and run with -m slow, to keep the default suite's time.
@pytest.mark.parametrize("answer", ["wrong-shape", pytest.param("non-finite", marks=pytest.mark.slow),
                                    pytest.param("extra-result", marks=pytest.mark.slow)])
def test_a_node_answering_wrongly_is_avoided_and_the_output_still_equals_transformers(tmp_path, monkeypatch, answer):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_ids(checkpoint)
    with Swarm(tmp_path) as swarm:
        swarm.start_node(checkpoint, "0:4", *HONEST)
        honest = swarm.start_node(checkpoint, "4:8", *HONEST)
        monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
        liar = swarm.start_node(checkpoint, "4:8", env={"BIOPETALS_BROKEN": f"{answer},fast-liar"})
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", step_timeout=30.0)
        try:
            with model.inference_session(max_length=ids.shape[1] + 8) as session:
                ours = model.generate(ids, max_new_tokens=8, do_sample=False)
                route = [p for p, _, _ in session.route[0]]
                failovers = session.failovers
            assert model.swarm.health.is_banned(liar.peer_id, time.monotonic())
        finally:
            model.close()
    assert torch.equal(ours, reference.generate(ids, max_new_tokens=8, do_sample=False))
    assert failovers >= 1 and liar.peer_id not in route and honest.peer_id in route
