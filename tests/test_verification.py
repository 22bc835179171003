"""The rules of verified computation (client/verification.py) and the chain's rebuild, without I/O.

Sampling, the tolerance of spec/tensors.md §10, the comparison, the choice of a replica, the
arbitration plan of one check, the client's memory of liars, and ``SessionChain.rebuild`` (the
chain rebuilt around a liar with the replay plan) on the fake swarm of tests/test_client_chain.py.
tests/test_verification_swarm.py runs the same rules on real node processes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_client_chain import CallSim, FakeNode, Sim, chain, step, three_spans
from test_sans_io import violations

from biopetals.client.chain import Abandon, CallChain, SendStep
from biopetals.client.routing import ServerSpan
from biopetals.client.swarm import ClientConfig
from biopetals.client.verification import (
    ROW_FLOOR,
    Check,
    Verifier,
    VerifyParams,
    compare,
    input_digest,
    pick_replica,
    rebuilt_records,
    should_check,
    tolerance,
    unit_roundoff,
)


def test_the_verification_rules_are_sans_io():
    assert violations(Path(__file__).resolve().parent.parent / "client" / "verification.py") == []


# ---------------------------------------------------------------------------------------- sampling


def test_sampling_checks_a_step_when_the_draw_is_under_the_rate():
    assert not any(should_check(0.0, d) for d in (0.0, 0.5, 0.999))
    assert all(should_check(1.0, d) for d in (0.0, 0.5, 0.999999))
    draws = [i / 1000 for i in range(1000)]
    assert sum(should_check(0.05, d) for d in draws) == 50


@pytest.mark.parametrize("rate", [-0.1, 1.5, math.nan, "0.5", None])
def test_a_bad_rate_is_refused_with_a_clear_error(rate):
    with pytest.raises(ValueError, match="verify must be a rate in"):
        VerifyParams(rate=rate)
    with pytest.raises(ValueError, match="verify must be a rate in"):
        ClientConfig(verify=rate).verify_params()


@pytest.mark.parametrize("tol", [0.0, -1.0, math.inf])
def test_a_bad_tolerance_is_refused(tol):
    with pytest.raises(ValueError, match="verify_tolerance"):
        VerifyParams(rate=0.5, tolerance=tol)


# ---------------------------------------------------------------------------------------- tolerance


def test_the_tolerance_follows_the_codec_and_the_coarsest_dtype():
    assert unit_roundoff("f32") == unit_roundoff("float32") == 2.0 ** -24
    assert unit_roundoff("f16") == unit_roundoff("f16+zstd") == unit_roundoff("float16") == 2.0 ** -11
    assert unit_roundoff("bf16") == unit_roundoff("bfloat16") == unit_roundoff("int3") == 2.0 ** -8
    f32 = tolerance("f32", ["float32", "float32"], 8)
    assert f32 == pytest.approx(4 * 2.0 ** -24 + 256 * math.sqrt(8) * 2.0 ** -24)
    assert 4e-5 < f32 < 5e-5
    f16_wire = tolerance("f16", ["float32"], 8)
    assert f16_wire == pytest.approx(4 * 2.0 ** -11 + 256 * math.sqrt(8) * 2.0 ** -24)
    assert tolerance("f16", ["bfloat16"], 8) == pytest.approx(4 * 2.0 ** -11 + 16 * math.sqrt(8) * 2.0 ** -8)
    # the coarsest compute dtype of the two nodes decides, and more blocks allow more
    assert tolerance("f16", ["float32", "bfloat16"], 8) == tolerance("f16", ["bfloat16"], 8) > f16_wire
    assert tolerance("f16", ["float16"], 32) > tolerance("f16", ["float16"], 8)
    assert tolerance("f16", [], 8) == tolerance("f16", ["int3"], 8) == tolerance("f16", ["bfloat16"], 8)
    assert Verifier(VerifyParams(rate=1.0, tolerance=0.25)).tolerance("f16", ["float16"], 8) == 0.25


def test_compare_is_the_worst_relative_row_error_without_padding():
    ref = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
    assert compare(ref.clone(), ref) == 0.0
    off = ref.clone()
    off[0, 1, 0] = 1.5  # the second row is 50 % off, the first exact
    assert compare(off, ref) == pytest.approx(0.5)
    assert compare(off, ref, torch.tensor([[True, False]])) == 0.0  # the bad row is padding
    assert compare(ref[:, :1], ref) == math.inf
    nan = ref.clone()
    nan[0, 0, 0] = math.nan
    assert compare(nan, ref) == math.inf and compare(ref, nan) == math.inf


def test_the_input_digest_names_values_and_shape():
    x = torch.arange(6.0).reshape(1, 3, 2)
    assert input_digest(x) == input_digest(x.clone()) != input_digest(x.reshape(1, 2, 3))
    assert input_digest(x).startswith("sha256:") and len(input_digest(x)) == 7 + 64


# ---------------------------------------------------------------------------------------- replicas


def _servers():
    return [ServerSpan("A", 0, 8), ServerSpan("B", 0, 4), ServerSpan("C", 2, 8), ServerSpan("D", 0, 8, quant="nf4"),
            ServerSpan("E", 0, 8, online=False), ServerSpan("F", 0, 8, adapters=("lora",)), ServerSpan("G", 0, 8)]


def test_a_replica_serves_the_whole_span_with_the_same_weights_and_is_not_excluded():
    pick = lambda draw, **kw: pick_replica(_servers(), 2, 4, **{"quant": "none", "exclude": ["A"], "avoided": [],  # noqa: E731
                                                                  "adapter": None, "draw": draw, **kw})
    # B 0:4 and C 2:8 cover 2:4, F and G 0:8 too; D is quantised, E offline, A excluded
    assert [pick(d).peer_id for d in (0.0, 0.3, 0.6, 0.99)] == ["B", "C", "F", "G"]
    assert pick(0.0, avoided=["B", "C"]).peer_id == "F"
    assert pick(0.0, adapter="lora").peer_id == "F" and pick(0.5, adapter="lora").peer_id == "F"
    assert pick(0.0, quant="nf4").peer_id == "D"
    assert pick_replica(_servers(), 0, 8, quant="none", exclude=["A", "F", "G"], avoided=[], adapter=None,
                        draw=0.5) is None  # nobody else covers 0:8 unquantised and online


# ---------------------------------------------------------------------------------------- arbitration


OUT = torch.ones(1, 2, 4)
BAD = OUT * 2


def test_an_output_the_replica_agrees_with_is_ok_without_an_arbiter():
    check = Check("P", OUT, 1e-3)
    assert check.wanted() == ("P",)
    check.answer("R", OUT + 1e-5)
    assert check.verdict == "ok" and check.wanted() is None and check.liar is None
    with pytest.raises(RuntimeError):
        check.answer("T", OUT)


def test_a_disagreement_is_decided_by_a_third_node():
    check = Check("P", BAD, 1e-3)
    check.answer("R", OUT)
    assert check.verdict is None and check.wanted() == ("P", "R")
    check.answer("T", OUT)
    assert check.verdict == "liar" and check.liar == "P"
    assert check.errors["replica"] == pytest.approx(1.0) and check.errors["arbiter_vs_replica"] == 0.0

    check = Check("P", OUT, 1e-3)
    check.answer("R", BAD)
    check.answer("T", OUT)
    assert check.verdict == "replica-liar" and check.liar == "R"


def test_without_an_arbiter_or_with_three_answers_the_check_is_unresolved_and_nobody_is_blamed():
    check = Check("P", BAD, 1e-3)
    check.answer("R", OUT)
    check.unavailable()
    assert check.verdict == "unresolved" and check.liar is None
    check = Check("P", BAD, 1e-3)
    check.answer("R", OUT)
    check.answer("T", OUT * 3)
    assert check.verdict == "unresolved" and check.liar is None
    check = Check("P", OUT, 1e-3)
    check.unavailable()
    assert check.verdict == "unverified"


def test_the_verifier_remembers_liars_for_good_and_warns_once_per_unverified_span():
    verifier = Verifier(VerifyParams(rate=0.05))
    assert verifier.enabled and not Verifier(VerifyParams()).enabled
    check = Check("P", BAD, 1e-3)
    check.answer("R", OUT)
    check.answer("T", OUT)
    evidence = check.evidence("step", 0, 4, (7, 8), torch.zeros(1, 8, 4), now=1.7e9)
    assert verifier.decided(check, evidence) == "P" and verifier.is_liar("P") and not verifier.is_liar("R")
    assert verifier.checks == 1 and verifier.disagreements == 1
    record = json.loads(json.dumps(evidence.record()))
    assert record["liar"] == record["accused"] == "P" and record["replica"] == "R" and record["arbiter"] == "T"
    assert record["positions"] == [7, 8] and record["input_digest"] == input_digest(torch.zeros(1, 8, 4))
    assert set(evidence.tensors) == {"inputs", "accused_output", "replica_output", "arbiter_output"}
    shape = Check("P", OUT[:, :1], 1e-3)
    shape.answer("R", OUT)
    assert json.loads(json.dumps(shape.evidence("step", 0, 4, (0, 1), OUT, 0.0).record()))["errors"]["replica"] == "inf"
    assert verifier.first_unverified(0, 4) and not verifier.first_unverified(0, 4) and verifier.first_unverified(4, 8)


# ---------------------------------------------------------------------------------------- the chain's rebuild


def test_a_step_records_what_each_span_was_fed_and_answered():
    sim, state = three_spans(), chain()
    step(sim, state, tokens=3)
    out = step(sim, state)
    assert [(s.peer_id, f.position, tuple(o.shape)) for s, f, o in state.records] == [
        ("A", 3, (1, 1, 2)), ("B", 3, (1, 1, 2)), ("C", 3, (1, 1, 2))]
    assert torch.equal(state.records[-1][2], out) and state.records[1][1] is state.spans[1].history[-1]


def test_a_rebuild_replaces_the_liars_span_and_all_after_it_and_returns_the_replayed_outputs():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state, tokens=3)
    out = step(sim, state)
    old = list(state.spans)
    sim.banned.add("B")  # the driver's routes skip a proven liar
    sent = len(sim.sends())
    state.rebuild(1, sim.now)
    replayed = sim.drive(state)
    assert [s.peer_id for s in state.spans] == ["A", "B2", "C"] and state.spans[2] is not old[2]
    assert state.rebuilds == 1 and state.failovers == 0 and state.position == 4
    assert [f.position for f, _ in replayed] == [0, 3] and torch.equal(replayed[-1][1], out)
    closed = [a for a in sim.log if isinstance(a, Abandon)]
    assert closed[0].close and list(closed[0].spans) == old[1:]
    # the replay: each step in its chunk, no push, B2 then C; A is untouched
    assert [(a.span.peer_id, a.step_id, a.position, a.hops) for a in sim.sends()[sent:]] == [
        ("B2", 1, 0, ()), ("C", 1, 0, ()), ("B2", 4, 3, ()), ("C", 4, 3, ())]
    # what the rebuilt spans answered for the step, to be checked in turn: B2's output is C's input
    records = rebuilt_records(state.spans, 1, 3, replayed)
    assert [(s.peer_id, f.position) for s, f, _ in records] == [("B2", 3), ("C", 3)]
    assert torch.equal(records[0][2], state.spans[2].history[-1].hidden) and torch.equal(records[1][2], out)
    step(sim, state)  # and the chain goes on, with push through the new spans
    assert [h.peer_id for h in sim.sends()[-1].hops] == ["B2", "C"]
    assert isinstance(sim.sends()[-1], SendStep) and sim.sends()[-1].span.peer_id == "A"


def test_a_rebuild_is_refused_out_of_range_or_once_closed():
    sim, state = three_spans(), chain()
    step(sim, state)
    with pytest.raises(ValueError, match="no span 3"):
        state.rebuild(3, sim.now)
    state.close()
    with pytest.raises(Exception, match="closed"):
        state.rebuild(0, sim.now)


def test_a_backward_records_each_single_span_part_for_checking():
    sim = CallSim(("A", 0, 3), ("B", 3, 8), ("B1", 3, 5), ("B2", 5, 8))
    c = CallChain(8, timeout=5.0)
    x = torch.ones(1, 2, 2)
    c.forward(x, None, None, 0.0)
    _, trace = sim.drive(c)
    g = torch.ones(1, 2, 2)
    c.backward(trace, g, None, None, 1.0)
    sim.drive(c)
    # (span, input, grad_outputs, grad_inputs), last span first; a node doubles the gradient per block
    assert [(r.peer_id, float(gi.max() / go.max())) for r, _, go, gi in c.backward_records] == [("B", 32.0), ("A", 8.0)]
    assert torch.equal(c.backward_records[0][1], x * 8) and torch.equal(c.backward_records[1][1], x)
    # a span whose node failed and was split over two is not recorded (no single node to compare)
    sim.servers = [s for s in sim.servers if s.peer_id != "B"]
    sim.failing = {"B"}
    c.backward(trace, g, None, None, 2.0)
    sim.drive(c)
    assert [r.peer_id for r, *_ in c.backward_records] == ["A"]


def test_compare_counts_a_near_zero_gradient_row_against_the_largest_row():
    ref = torch.tensor([[[1000.0, 0.0], [1e-9, 0.0]]])
    off = ref.clone()
    off[0, 1, 0] = 2e-9  # 100 % of a negligible row: 1e-9 of the largest, not an alarm
    assert compare(off, ref) == pytest.approx(1e-9 / (ROW_FLOOR * 1000.0))
    assert compare(torch.zeros(1, 0, 2), torch.zeros(1, 0, 2)) == 0.0
