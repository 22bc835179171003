"""Speculative decoding through the swarm, over real node processes, against transformers.

``model.generate(ids, prompt_lookup_num_tokens=K)`` and ``model.generate(ids, assistant_model=draft)``
send the candidates through the chain as one step and roll the nodes' caches back to the accepted
tokens (spec/messages.md §5.6.1, ``Step.truncate``). The reference is transformers' own model on the
same checkpoint: greedy speculative output equals its plain greedy output token for token, sampling
equals its speculative sampling under the same seed, and a node killed mid-generation is replaced
by a replay of the rolled-back history without changing a token. Activations travel as f32.
The rules themselves are tested sans-IO: tests/test_node_rollback.py, tests/test_client_rollback.py.
"""

from __future__ import annotations

import pytest
import support_swarm
import torch
from support_models import make_tiny_checkpoint
from support_swarm import Swarm
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from test_client_generate import checkpoint, model, reference  # noqa: F401 - fixtures
from test_conformance import BROKEN_NODE

from biopetals.client import AutoDistributedModelForCausalLM, RollbackUnsupportedError
from biopetals.client.local_swarm import LocalSwarm

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

NEW = 24
# a prompt that repeats itself, so that prompt lookup finds candidates
TEXT = "the cell the cell divides and the cell the cell divides and the cell"


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A second tiny model with the same vocabulary (another seed, 2 layers): most candidates rejected."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("spec") / "draft", num_layers=2, seed=7)
    draft = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # 4 candidates a round, always: transformers' "heuristic" schedule would carry its count from
    # one generate() call to the next, so our run and the reference's would draft differently
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    return draft


@pytest.fixture(scope="module")
def swarm(checkpoint):
    """Blocks 4:8 twice: the failover test kills the one on the route. (``checkpoint``, ``reference``
    and ``model`` are tests/test_client_generate.py's fixtures, over this swarm.)"""
    with LocalSwarm(checkpoint, [(0, 4), (4, 8), (4, 8)]) as s:
        yield s


@pytest.fixture(scope="module")
def ids(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)(TEXT, return_tensors="pt").input_ids


def greedy(reference, ids):
    return reference.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def speculate(model, ids, **kwargs):
    """``model.generate`` in a session of its own; returns the sequences and the session. The session
    leaves room for a last step's candidates past ``max_length`` (prompt lookup's, up to K)."""
    with model.inference_session(max_length=ids.shape[1] + NEW + 4) as session:
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, **kwargs)
    return out, session


def test_greedy_prompt_lookup_equals_plain_greedy(model, reference, ids):
    out, session = speculate(model, ids, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(out, greedy(reference, ids))
    # candidates went through as multi-token steps, and rejected ones were rolled back on the nodes
    assert session.rollbacks > 0 and session.position == ids.shape[1] + NEW - 1


def test_greedy_assistant_model_equals_plain_greedy(model, reference, draft, ids):
    out, session = speculate(model, ids, do_sample=False, assistant_model=draft)
    assert torch.equal(out, greedy(reference, ids))
    assert session.rollbacks > 0
    # a perfect draft (the model itself): every candidate accepted, nothing rolled back
    schedule = reference.generation_config.num_assistant_tokens_schedule
    reference.generation_config.num_assistant_tokens_schedule = "constant"
    try:
        out, session = speculate(model, ids, do_sample=False, assistant_model=reference)
    finally:
        reference.generation_config.num_assistant_tokens_schedule = schedule
    assert torch.equal(out, greedy(reference, ids)) and session.rollbacks == 0


def test_speculative_sampling_is_transformers_and_reproducible_with_a_seed(model, reference, draft, ids):
    kwargs = dict(do_sample=True, assistant_model=draft, max_new_tokens=24, temperature=1.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(model.generate(ids, **kwargs))
    torch.manual_seed(11)
    ref = reference.generate(ids, **kwargs)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], ref)


def test_a_node_killed_during_speculative_generation_is_replaced_exactly(model, reference, swarm, ids):
    """Kill the route's node for blocks 4:8 after a few rounds: its replacement replays the history
    as it is after the rollbacks, and the output is still transformers' greedy output."""
    killed = []

    class KillAfter(TextStreamer):
        def __init__(self) -> None:
            self.calls = 0

        def put(self, value) -> None:
            self.calls += 1
            if self.calls == 4 and not killed:
                self.rolled_back_before = model.active_session.rollbacks
                peer = next(p for p, s, _ in model.active_session.route[0] if s == 4)
                killed.append(next(n for n in swarm.nodes if n.peer_id == peer))
                killed[0].kill()

        def end(self) -> None:
            pass

    streamer = KillAfter()
    out, session = speculate(model, ids, do_sample=False, prompt_lookup_num_tokens=4, streamer=streamer)
    assert killed and session.failovers == 1 and streamer.rolled_back_before > 0
    assert killed[0].peer_id not in [p for p, _, _ in session.route[0]]
    assert torch.equal(out, greedy(reference, ids))


@pytest.mark.slow
def test_a_route_with_a_revision_3_node_is_refused_clearly(tmp_path, monkeypatch, checkpoint, reference, ids):
    """A node that does not roll back (tests/broken_node.py ``revision-3``): speculative generate() raises
    ``RollbackUnsupportedError`` naming it, before any rollback is sent; plain generate() still works."""
    with Swarm(tmp_path) as swarm:
        swarm.start_node(checkpoint, "0:4", "--no-benchmark")
        monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
        old = swarm.start_node(checkpoint, "4:8", "--no-benchmark", env={"BIOPETALS_BROKEN": "revision-3"})
        m = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", step_timeout=30.0)
        try:
            with pytest.raises(RollbackUnsupportedError, match=f"{old.peer_id} on the route do not accept"):
                m.generate(ids, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=4)
            plain = m.generate(ids, max_new_tokens=8, do_sample=False)
        finally:
            m.close()
    assert torch.equal(plain, reference.generate(ids, max_new_tokens=8, do_sample=False))
