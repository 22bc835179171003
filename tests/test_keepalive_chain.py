"""A chain step longer than the nodes' idle timeout, over real node processes (spec/messages.md §5.9.1).

Issue 22's last defect: a long prefill through slow nodes made the later nodes close their sessions
as idle while they waited for the first node's ``Push``, and the first node close its own while the
later ones computed. Here each of two nodes takes 3 s more for its prefill (tests/broken_node.py
``slow-prefill``) and both close sessions idle for 1.5 s: the second waits twice its idle timeout
for the push, the first as long for the second. The client keeps the chain's sessions alive while
the step's results are awaited, so the greedy tokens equal transformers' on the same checkpoint with
no session closed (no failover, no replay). Without the client's ``KeepAlive`` a node closes its
session during the prefill (checked by hand: the generate then fails). The rules are tested sans-IO in tests/test_node_keepalive.py and
tests/test_client_keepalive.py.
"""

from __future__ import annotations

import pytest
import support_swarm
import torch
from support_models import make_tiny_checkpoint
from support_swarm import Swarm
from test_chain_binding import prompt_ids
from test_conformance import BROKEN_NODE
from transformers import AutoModelForCausalLM

from biopetals.client import AutoDistributedModelForCausalLM

pytestmark = [pytest.mark.timeout(120), pytest.mark.exactness]

IDLE = "1.5"  # s, both nodes' --idle-timeout
SLOW = {"BIOPETALS_BROKEN": "slow-prefill", "BIOPETALS_SLOW_STEP": "3.0"}  # s more for a prefill: 2 idle timeouts
NEW = 4


def test_a_prefill_longer_than_the_idle_timeout_keeps_every_session(tmp_path, monkeypatch):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_ids(checkpoint)
    with Swarm(tmp_path) as swarm:
        swarm.start_dht()  # both nodes join through it, starting at once
        monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
        nodes = [swarm.spawn_node(checkpoint, "--blocks", blocks, "--no-benchmark", "--idle-timeout", IDLE, env=SLOW)
                 for blocks in ("0:4", "4:8")]
        for node in nodes:
            swarm.wait_ready(node)
        # the step deadline must not be what ends the slow prefill: only the idle timeout is under test
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32",
            step_timeout=30.0, step_timeout_floor=20.0, max_failovers=0)
        try:
            with model.inference_session(max_length=ids.shape[1] + NEW) as session:
                ours = model.generate(ids, max_new_tokens=NEW, do_sample=False)
                failovers, keepalives = session.failovers, session.keepalives_sent
        finally:
            model.close()
    assert torch.equal(ours, reference.generate(ids, max_new_tokens=NEW, do_sample=False))
    # no session closed: nothing replayed; the chain's sessions were kept alive during the prefill
    assert failovers == 0
    assert keepalives >= 2
