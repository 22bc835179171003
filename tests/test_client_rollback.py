"""Rollback in the client's chain state (client/chain.py ``crop``, spec/messages.md §5.6.1), sans-IO.

With the simulated swarm of tests/test_client_chain.py (fake nodes that keep their columns, drop
duplicates, push on and cut their columns on ``truncate``): a crop cuts the position and every
span's replay history, the next step carries ``truncate`` under a step id above every id sent,
a replay after a rollback rebuilds exactly the kept columns, and a chain with a node that does
not roll back is refused before anything is sent.
"""

from __future__ import annotations

import pytest
import torch
from test_client_chain import FakeNode, chain, columns, step, three_spans

from biopetals.client.chain import Fed, cut_history
from biopetals.client.errors import RequestError


def test_cut_history_keeps_the_columns_below_the_position():
    x = torch.arange(12.0).reshape(1, 6, 2)
    mask = torch.tensor([[False, True, True, True]])
    prompts = torch.ones(3, 1, 4, 2)
    history = [Fed(1, 0, x[:, :4], mask, prompts), Fed(5, 4, x[:, 4:5]), Fed(6, 5, x[:, 5:6])]
    assert cut_history(history, 6) == history
    assert cut_history(history, 0) == []
    (first, second) = cut_history(history, 5)
    assert (first, second) == (history[0], history[1])
    (first,) = cut_history(history, 2)  # a step across the cut keeps its first columns, its id stays
    assert first.step_id == 1 and first.position == 0 and torch.equal(first.hidden, x[:, :2])
    assert first.mask.tolist() == [[False, True]] and first.prompts.shape == (3, 1, 2, 2)
    (first,) = cut_history(history, 1)
    assert first.mask.tolist() == [[False]]
    history[0] = Fed(1, 0, x[:, :4], torch.tensor([[True, True, False, True]]))
    assert cut_history(history, 2)[0].mask is None  # all real: no mask (§8.1)


def test_crop_then_a_step_truncates_every_node_under_a_fresh_id():
    sim, state = three_spans(), chain()
    step(sim, state, tokens=4)  # id 1, columns 0-3
    step(sim, state, tokens=3)  # id 5, columns 4-6: three candidates
    state.crop(5)  # two rejected
    assert state.position == 5 and state.rolled_back
    assert [(f.step_id, f.position, f.hidden.shape[1]) for f in state.spans[1].history] == [(1, 0, 4), (5, 4, 1)]
    step(sim, state, tokens=2)
    last = sim.sends()[-1]
    assert (last.step_id, last.position, last.truncate) == (6, 5, True)  # above the 5 sent
    for name in "ABC":  # every node of the push chain cut the same columns
        assert columns(sim, name) == [(1, 0, 4), (5, 4, 1), (6, 5, 2)]
    assert state.position == 7 and not state.rolled_back
    step(sim, state)
    assert (sim.sends()[-1].step_id, sim.sends()[-1].truncate) == (8, False)
    # crop to the position changes nothing; the next step is an ordinary one
    state.crop(8)
    step(sim, state)
    assert sim.sends()[-1].truncate is False and sim.sends()[-1].step_id == 9


def test_step_ids_keep_growing_across_rollbacks():
    sim, state = three_spans(), chain()
    step(sim, state, tokens=5)  # id 1
    ids = []
    for _ in range(4):  # each round: 3 candidates, all rejected
        step(sim, state, tokens=3)
        ids.append(sim.sends()[-1].step_id)
        state.crop(state.position - 3)
    assert ids == [6, 7, 8, 9]  # strictly increasing, never reused (§5.7)
    assert columns(sim, "C")[-1][1] == 5


def test_a_failover_after_a_rollback_replays_exactly_the_kept_columns():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state, tokens=4)
    step(sim, state, tokens=3)
    state.crop(5)
    sim.kill("B")
    step(sim, state, tokens=2)
    assert [s.peer_id for s in state.spans] == ["A", "B2", "C"] and state.failovers == 1
    # the replacement got the history as it is after the cut, under the original ids, then the step
    assert columns(sim, "B2") == [(1, 0, 4), (5, 4, 1), (6, 5, 2)]
    replayed = [a for a in sim.sends() if a.span.peer_id == "B2"]
    assert [(a.step_id, a.position, a.hidden.shape[1], a.truncate) for a in replayed] == [
        (1, 0, 4, False), (5, 4, 1, False), (6, 5, 2, True)]
    # B's input of step 5 was A's output (3 blocks added) of 3 tokens; the replay sends the kept one
    assert torch.equal(replayed[1].hidden, torch.tensor([[[3.0, 4.0]]]))
    for name in "AC":
        assert columns(sim, name) == [(1, 0, 4), (5, 4, 1), (6, 5, 2)]
    step(sim, state)
    assert state.position == 8


def test_a_chain_with_a_node_that_cannot_roll_back_is_refused_before_sending():
    sim, state = three_spans(), chain()
    sim.node("B").rollback = False
    step(sim, state, tokens=4)
    sent = len(sim.sends())
    with pytest.raises(RequestError, match="B on the route do not accept cache rollback"):
        state.check_rollback()
    with pytest.raises(RequestError, match="cache rollback"):
        state.crop(2)
    assert state.position == 4 and not state.rolled_back and len(sim.sends()) == sent
    step(sim, state)  # the session goes on as before
    with pytest.raises(ValueError, match="cannot roll back to 9"):
        state.crop(9)
