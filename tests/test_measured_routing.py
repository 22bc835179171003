"""Routing by what is measured (issue 20 item 4) on real node processes.

A node that is slow (1 s more per step) but announces 10^9 tokens/s (tests/broken_node.py,
``slow,fast-liar``) serves blocks 4:8 beside an honest replica. A greedy ``generate()``
starts on the liar (its announcement wins while nothing is measured), measures it over a few
decode steps (client/measurements.py), moves its blocks to the honest node with a replay
(spec/messages.md §5.5, §5.9) and its tokens equal transformers' on the same checkpoint.
The rule's thresholds are tested on a fake clock in tests/test_client_measurements.py; this
test asserts the move and the output, never a time.
"""

from __future__ import annotations

import time

import pytest
import support_swarm
import torch
from support_models import make_tiny_checkpoint
from support_swarm import Swarm
from test_chain_binding import prompt_ids, remote_model
from test_conformance import BROKEN_NODE
from transformers import AutoModelForCausalLM

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]


def test_a_slow_node_announcing_itself_fast_is_measured_and_left(tmp_path, monkeypatch):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_ids(checkpoint)
    with Swarm(tmp_path) as swarm:
        swarm.start_node(checkpoint, "0:4", "--no-benchmark")
        honest = swarm.start_node(checkpoint, "4:8", "--no-benchmark")
        monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
        liar = swarm.start_node(checkpoint, "4:8", env={"BIOPETALS_BROKEN": "slow,fast-liar"})
        model = remote_model(checkpoint, swarm)
        try:
            with model.inference_session(max_length=ids.shape[1] + 8) as session:
                ours = model.generate(ids, max_new_tokens=8, do_sample=False)
                route = [p for p, _, _ in session.route[0]]
                moves, failovers = session.moves, session.failovers
            measured = model.swarm.speeds.samples(liar.peer_id, time.monotonic())
            banned = model.swarm.health.is_banned(liar.peer_id, time.monotonic())
        finally:
            model.close()
    assert torch.equal(ours, reference.generate(ids, max_new_tokens=8, do_sample=False))
    # it served the first decode steps (its announcement won), was measured over a few, and left
    assert 3 <= measured < 7
    assert moves == 1 and failovers == 0 and not banned  # a voluntary move, not a failure
    assert liar.peer_id not in route and honest.peer_id in route
