"""The chunking rule (client/chunking.py) and the chain state sending requests in pieces, with a fake clock.

spec/tensors.md §2: a sender MUST NOT produce a tensor over ``MAX_TENSOR_ELEMENTS`` or a
frame over ``MAX_FRAME_BYTES``; it splits the request. The rule's sizes are checked at
the mission's widths (Llama-3-8B hidden 4096, 70B 8192, SmolLM2 576); the chain state is
driven by the simulated swarm of tests/test_client_chain.py with a lowered element limit
(a named parameter), so a few tokens of width 2 already need several messages.
tests/test_client_chunking_real.py shows the same on real node processes against transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from biopetals.client.chain import CallBackward, CallChain, CallForward, SessionChain
from biopetals.client.chunking import Chunking, pieces
from biopetals.client.errors import RequestError
from biopetals.protocol.limits import MAX_FRAME_BYTES, MAX_TENSOR_ELEMENTS

from test_client_chain import DEADLINE, CallSim, FakeNode, Sim, columns, step, three_spans
from test_sans_io import violations


# ---------------------------------------------------------------------------------------- the rule


def test_the_rule_is_sans_io():
    assert violations(Path(__file__).resolve().parent.parent / "client" / "chunking.py") == []


@pytest.mark.parametrize("codec", ["f16", "f32", "bf16", "f16+zstd"])
@pytest.mark.parametrize("hidden, batch", [(4096, 1), (8192, 1), (576, 1), (4096, 8), (128, 64)])
def test_a_step_piece_is_the_most_tokens_under_every_limit(codec, hidden, batch):
    rule = Chunking(codec=codec)
    tokens = rule.step_tokens(batch, hidden)
    nbytes = 4 if codec == "f32" else 2
    fits = lambda t: t * batch * hidden <= MAX_TENSOR_ELEMENTS and t * batch * (hidden * nbytes + 1) <= \
        MAX_FRAME_BYTES - rule.reserve_bytes  # noqa: E731
    assert fits(tokens) and not fits(tokens + 1)


def test_the_pieces_follow_the_models_width_not_a_constant():
    rule = Chunking(codec="f16")
    assert rule.step_tokens(1, 4096) == 4096  # the 4200-token prompt: two steps
    assert pieces(4200, rule.step_tokens(1, 4096)) == [(0, 4096), (4096, 4200)]
    assert rule.step_tokens(1, 8192) == 2048  # a 70B-wide prefill
    assert rule.step_tokens(1, 576) > 8192  # SmolLM2: any prompt in one step
    # deep prompts for all 32 blocks travel with the first steps: the prompts tensor bounds them
    assert rule.step_tokens(1, 4096, prompt_blocks=32) == 128
    # Forward/Backward: whole sequences; the 8 x 600 at hidden 4096 goes as 6 + 2
    assert Chunking(codec="f32").call_rows(600, 4096, tensors=2) == 6
    assert pieces(8, 6) == [(0, 6), (6, 8)]
    # a node takes at most max_call_tokens (batch x tokens) in one call
    assert Chunking(codec="f16").call_rows(200, 64, tensors=2) == 40
    assert Chunking(codec="f16").call_rows(1, 64, tensors=2) == 64  # and at most MAX_BATCH sequences
    # one sequence over the limits cannot be split by a stateless call: 0, and the refusal says what to do
    assert Chunking(codec="f16").call_rows(4200, 4096, tensors=2) == 0
    assert "at most 4096 tokens" in Chunking(codec="f16").call_refusal(4200, 4096)


def test_limits_are_checked_and_a_sender_may_only_lower_them():
    with pytest.raises(ValueError, match="max_elements"):
        Chunking(max_elements=MAX_TENSOR_ELEMENTS + 1)
    with pytest.raises(ValueError, match="unknown codec"):
        Chunking(codec="f8")
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Chunking(max_frame_bytes=MAX_FRAME_BYTES * 2)


# ---------------------------------------------------------------------------------------- chunked prefill

def chunked(max_length: int = 64, batch: int = 1, elements: int = 10) -> SessionChain:
    return SessionChain(8, max_length, batch, deadline=lambda *_: DEADLINE,
                        chunking=Chunking(codec="f32", max_elements=elements))


def test_a_long_prefill_goes_as_consecutive_steps_with_their_own_positions_and_ids():
    sim, state = three_spans(), chunked()
    step(sim, state, tokens=12)  # the output is the whole prefill's (checked by step())
    assert [(a.step_id, a.position, a.hidden.shape[1]) for a in sim.sends()] == [(1, 0, 5), (6, 5, 5), (11, 10, 2)]
    assert all(a.hidden.numel() <= 10 for a in sim.sends())
    assert state.position == 12
    for name in "ABC":  # every node holds the same columns, pushed step by step
        assert columns(sim, name) == [(1, 0, 5), (6, 5, 5), (11, 10, 2)]
    step(sim, state, tokens=1)
    assert columns(sim, "C")[-1] == (13, 12, 1)


def test_a_replacement_replays_the_chunked_history_in_its_chunks():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chunked()
    step(sim, state, tokens=12)
    sim.kill("B")
    step(sim, state, tokens=3)
    assert [f.peer_id for f in sim.avoided()] == ["B"]
    assert columns(sim, "B2") == [(1, 0, 5), (6, 5, 5), (11, 10, 2), (13, 12, 3)]
    assert state.position == 15


class StallsAfterOneStep(FakeNode):
    """A node that answers its first step, then says nothing."""

    @property
    def stalled(self) -> bool:
        return sum(len(s.steps) for s in self.sessions) >= 1

    @stalled.setter
    def stalled(self, value: bool) -> None:
        pass


def test_a_node_stalling_mid_prefill_is_replaced_and_the_prefill_goes_on():
    sim = Sim(FakeNode("A", 0, 3), FakeNode("B", 3, 6), StallsAfterOneStep("C", 6, 8), FakeNode("C2", 6, 8))
    sim.banned.add("C2")  # the first route goes through C
    state = chunked()
    x = torch.arange(24, dtype=torch.float32).reshape(1, 12, 2)
    state.step(x, None, None, sim.now)
    sim.banned.clear()
    assert torch.equal(sim.drive(state), x + 8)
    assert [(f.peer_id, f.code is not None) for f in sim.avoided()] == [("C", True)]
    assert columns(sim, "C2") == [(1, 0, 5), (6, 5, 5), (11, 10, 2)]  # chunk 1 replayed, then the rest
    assert columns(sim, "C") == [(1, 0, 5)]


def test_each_chunk_carries_its_columns_of_the_mask_and_of_the_deep_prompts():
    sim, state = three_spans(), chunked(batch=2, elements=160)  # prompts of 8 blocks x 2 x 2: 5 tokens a step
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :7] = False  # left padding over the first chunk and part of the second
    prompts = torch.zeros(8, 2, 7, 2)
    step(sim, state, tokens=12, mask=mask, prompts=prompts)
    sends = sim.sends()
    assert [None if a.mask is None else a.mask.tolist() for a in sends] == [
        mask[:, :5].tolist(), mask[:, 5:10].tolist(), None]  # the last chunk has no padding: no mask
    assert [None if a.prompts is None else tuple(a.prompts.shape) for a in sends] == [(8, 2, 5, 2), (8, 2, 2, 2), None]
    assert sim.node("C").sessions[-1].prompts == [(2, 2, 5, 2), (2, 2, 2, 2), None]


def test_a_step_whose_single_token_is_over_the_limits_is_refused_before_sending():
    sim, state = three_spans(), chunked(batch=8, elements=10)
    with pytest.raises(RequestError, match="refused before sending.*smaller batch"):
        state.step(torch.zeros(8, 1, 2), None, None, 0.0)
    assert not state.busy and state.action is None and not sim.log


# ---------------------------------------------------------------------------------------- forward / backward


def test_forward_and_backward_of_a_large_batch_go_in_groups_of_whole_sequences():
    sim = CallSim(("A", 0, 3), ("B", 3, 8))
    # 2 sequences a call: their deep prompts for 8 blocks are 2 x 8 x 1 x 2 elements
    c = CallChain(8, timeout=5.0, chunking=Chunking(codec="f32", max_elements=32))
    x = torch.randn(5, 2, 2)
    prompts = torch.randn(8, 5, 1, 2)
    mask = torch.ones(5, 2, dtype=torch.bool)
    mask[4, 0] = False
    c.forward(x, mask, prompts, 0.0)
    out, trace = sim.drive(c)
    assert torch.equal(out, x * 2 ** 8)
    forwards = [a for a in sim.log if isinstance(a, CallForward)]
    assert [(a.span.peer_id, a.hidden.shape[0]) for a in forwards] == [("A", 2), ("A", 2), ("A", 1), ("B", 2),
                                                                         ("B", 2), ("B", 1)]
    assert all(a.hidden.numel() <= 32 and (a.prompts is None or a.prompts.numel() <= 32) for a in forwards)
    assert [a.mask is None for a in forwards[:3]] == [True, True, False]  # only the last group has padding
    assert torch.equal(forwards[2].prompts, prompts[:3, 4:])
    grad = torch.randn(5, 2, 2)
    c.backward(trace, grad, mask, prompts, 1.0)
    g, grad_prompts = sim.drive(c)
    assert torch.equal(g, grad * 2 ** 8)
    assert [grad_prompts[b].unique().tolist() for b in range(8)] == [[0.0]] * 3 + [[3.0]] * 5
    backwards = [a for a in sim.log if isinstance(a, CallBackward)]
    assert [(a.span.peer_id, a.hidden.shape[0], a.grad.shape[0]) for a in backwards] == [
        ("B", 2, 2), ("B", 2, 2), ("B", 1, 1), ("A", 2, 2), ("A", 2, 2), ("A", 1, 1)]
    assert torch.equal(backwards[1].grad, grad[2:4] * 1)  # the output gradient's own rows


def test_a_sequence_too_long_for_one_call_is_refused_before_sending_with_what_to_do():
    c = CallChain(8, timeout=5.0, chunking=Chunking(codec="f32", max_elements=8))
    with pytest.raises(RequestError, match=r"refused before sending.*at most 4 tokens"):
        c.forward(torch.zeros(1, 5, 2), None, None, 0.0)
    assert not c.busy and c.action is None
    with pytest.raises(RequestError, match=r"deep prompts of 8 blocks x 3 positions"):
        c.forward(torch.zeros(1, 4, 2), None, torch.zeros(8, 1, 3, 2), 0.0)


# ---------------------------------------------------------------------------------------- the request's own errors


@pytest.mark.parametrize("bad, code", [
    (torch.zeros(1, 3, 3), "HIDDEN_SIZE_MISMATCH"),  # the model's width is 2
    (torch.tensor([[[0.0, float("nan")]]]), "NON_FINITE"),
    (torch.tensor([[[float("inf"), 0.0]]]), "NON_FINITE"),
])
def test_what_every_node_would_refuse_is_refused_before_sending(bad, code):
    """A shape or a value that any node would refuse (spec/messages.md §7.2) is the request's fault: raised at
    once with what to do, nothing sent, no node avoided; the session stays usable."""
    sim = three_spans()
    state = SessionChain(8, 64, 1, deadline=lambda *_: DEADLINE, hidden_size=2)
    with pytest.raises(RequestError, match=f"refused before sending: {code}.*(hidden size|NaN)"):
        state.step(bad, None, None, 0.0)
    assert not sim.log and not state.busy
    step(sim, state, tokens=2)  # a valid step afterwards goes through
    c = CallChain(8, timeout=5.0, hidden_size=2)
    with pytest.raises(RequestError, match=code):
        c.forward(bad, None, None, 0.0)
    with pytest.raises(RequestError, match=code):
        c.backward([], bad, None, None, 0.0)
    assert not c.busy


def test_a_session_over_the_protocols_or_the_models_length_is_refused_before_opening():
    from biopetals.protocol.limits import MAX_BATCH, MAX_SEQUENCE_LENGTH

    with pytest.raises(RequestError, match="refused before sending.*MAX_SEQUENCE_LENGTH"):
        SessionChain(8, MAX_SEQUENCE_LENGTH + 1, 1, deadline=lambda *_: DEADLINE)
    with pytest.raises(RequestError, match="refused before sending.*MAX_BATCH"):
        SessionChain(8, 64, MAX_BATCH + 1, deadline=lambda *_: DEADLINE)
    with pytest.raises(RequestError, match="refused before sending.*MAX_SEQUENCE_LENGTH"):
        CallChain(8, timeout=5.0).forward(torch.zeros(1, MAX_SEQUENCE_LENGTH + 1, 2), None, None, 0.0)
    # the model's own context, when the client knows it: every node would refuse it (LIMIT_EXCEEDED)
    with pytest.raises(RequestError, match="refused before sending.*the model has 100 positions"):
        SessionChain(8, 101, 1, deadline=lambda *_: DEADLINE, max_positions=100)
    with pytest.raises(RequestError, match="refused before sending.*the model has 100 positions"):
        CallChain(8, timeout=5.0, max_positions=100).forward(torch.zeros(1, 101, 2), None, None, 0.0)
    assert SessionChain(8, 100, 1, deadline=lambda *_: DEADLINE, max_positions=100).max_length == 100
