"""Routing by what is measured (client/measurements.py; issue 20 item 4), without I/O, on a fake clock.

The simulated swarm of tests/test_client_chain.py drives ``SessionChain``; here its routes
come from the real ``find_route`` over the nodes' announcements and the client's
``SpeedBook``, and after each step the driver's rule runs as client/session.py runs it:
record each span's own time, ask ``slow_span``, and ``move`` the span it names. A node
that announces itself fast but is slow gets the first route, and loses it within a few
decode steps; a node only somewhat slower than its alternative keeps it (no flapping).
tests/test_measured_routing.py shows the same on real node processes.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from test_client_chain import FakeNode, Sim, chain, step
from test_sans_io import violations

from biopetals.client.chain import Abandon, Finished, Rebind
from biopetals.client.measurements import MeasureParams, SpanTiming, SpeedBook, slow_span
from biopetals.client.routing import RouteSpan, ServerSpan, find_route, route_cost


def node(name: str, start: int, end: int, tps: float, delay: float) -> FakeNode:
    n = FakeNode(name, start, end, delay)
    n.server = replace(n.server, inference_tps=tps)
    return n


class MeasuredSim(Sim):
    """Routes by announced throughput and measured step times, as ``RemoteSwarm.find_route`` does."""

    def __init__(self, *nodes: FakeNode, params: MeasureParams = MeasureParams()) -> None:
        super().__init__(*nodes)
        self.book = SpeedBook(params)
        self.moves: list[str] = []  # the peers moved off, in order

    def route(self, start: int, end: int) -> list[RouteSpan]:
        servers = [n.server for n in self.nodes if n.server.peer_id not in self.banned]
        return find_route(servers, start, end, now=self.now, rng=random.Random(0),
                          measured=self.book.believed_block_times(self.now))

    def measured_step(self, state) -> None:
        """One decode step, then the driver's rule (client/session.py ``ChainSession._reconsider``)."""
        step(self, state)
        for timing in state.timings:
            self.book.record(timing, self.now)
        spans = [(s.peer_id, s.start, s.end, s.decode_steps) for s in state.spans]
        slow = slow_span(spans, [n.server for n in self.nodes], self.book, now=self.now)
        if slow is not None:
            state.move(slow.index, slow.reason, self.now)
            if self.drive(state):
                self.moves.append(slow.peer_id)


def liar_swarm(liar_delay: float = 0.5, honest_delay: float = 0.01) -> MeasuredSim:
    """A 0:3, C 6:8; for 3:6 a liar (announces 10^9 tokens/s) and an honest replica (announces 50)."""
    return MeasuredSim(node("A", 0, 3, 50.0, 0.01), node("LIAR", 3, 6, 1e9, liar_delay),
                       node("B", 3, 6, 50.0, honest_delay), node("C", 6, 8, 50.0, 0.01))


def test_the_measurement_rule_is_sans_io():
    assert violations(Path(__file__).resolve().parent.parent / "client" / "measurements.py") == []


def test_a_fast_liar_gets_the_first_route_and_loses_it_within_a_few_steps():
    sim, state = liar_swarm(), chain()
    step(sim, state, tokens=4)  # the prefill: announcements decide, and it is not a decode sample
    assert [s.peer_id for s in state.spans] == ["A", "LIAR", "C"]
    for _ in range(3):
        sim.measured_step(state)
    # three decode samples (MeasureParams.min_samples) and it is gone, its history replayed onto B
    assert sim.moves == ["LIAR"] and state.moves == 1 and state.failovers == 0
    assert [s.peer_id for s in state.spans] == ["A", "B", "C"]
    assert [s.steps for s in sim.node("B").sessions][-1] == [(1, 0, 4), (5, 4, 1), (6, 5, 1), (7, 6, 1)]
    assert [(a.span.peer_id, a.upstream) for a in sim.log if isinstance(a, Rebind)] == [("C", "B")]
    closed = [a for a in sim.log if isinstance(a, Abandon) and a.close]
    assert [s.peer_id for a in closed for s in a.spans] == ["LIAR"]  # make before break: closed politely
    assert not sim.banned  # nothing failed: the liar is only costed at what it measured
    for _ in range(20):  # and it stays away: no flapping back once its ban-free estimate is known
        sim.measured_step(state)
    assert sim.moves == ["LIAR"] and [s.peer_id for s in state.spans] == ["A", "B", "C"]
    assert state.position == 4 + 23


def test_a_span_is_charged_its_own_time_not_the_spans_before_it():
    sim, state = liar_swarm(liar_delay=0.2), chain()
    sim.node("A").delay = 0.3
    step(sim, state)
    own = {t.peer_id: t.seconds for t in state.timings}
    assert own == pytest.approx({"A": 0.3, "LIAR": 0.2, "C": 0.01})


def test_a_node_somewhat_slower_than_its_alternative_keeps_the_session():
    """Hysteresis: about 2x what the alternative is expected to cost (B announces 50 tokens/s over 3 blocks:
    0.02 s + the 0.005 s default round trip) is below ``move_factor`` (3x): no move, ever."""
    sim, state = liar_swarm(liar_delay=0.05, honest_delay=0.02), chain()
    step(sim, state)
    for _ in range(10):
        sim.measured_step(state)
    assert sim.moves == [] and [s.peer_id for s in state.spans] == ["A", "LIAR", "C"]


def test_a_saving_below_min_gain_is_not_worth_a_replay():
    sim, state = liar_swarm(liar_delay=0.04, honest_delay=0.001), chain()  # 8x slower, but 0.04 s < 0.05 s
    sim.node("B").server = replace(sim.node("B").server, inference_tps=1e4)
    step(sim, state)
    for _ in range(5):
        sim.measured_step(state)
    assert sim.moves == []


def test_a_slow_node_with_no_alternative_is_kept():
    sim = MeasuredSim(node("A", 0, 3, 50.0, 0.01), node("LIAR", 3, 6, 1e9, 0.5), node("C", 6, 8, 50.0, 0.01))
    state = chain()
    for _ in range(6):
        sim.measured_step(state)
    assert sim.moves == [] and state.moves == 0 and [s.peer_id for s in state.spans] == ["A", "LIAR", "C"]


def test_a_move_that_cannot_open_keeps_the_slow_span_and_the_session_goes_on():
    sim, state = liar_swarm(), chain()
    step(sim, state)
    sim.node("B").dead = True  # the alternative refuses to open: it is avoided, the liar stays
    for _ in range(3):
        sim.measured_step(state)
    assert sim.moves == [] and "B" in sim.banned
    assert [s.peer_id for s in state.spans] == ["A", "LIAR", "C"]
    assert isinstance(state.action, Finished) and state.action.value is False
    sim.measured_step(state)  # the session still works
    assert state.position == 5


def test_the_book_keeps_an_ewma_of_decode_steps_only_and_forgets_stale_estimates():
    book = SpeedBook(MeasureParams(alpha=0.5, min_samples=2, forget_after=100.0))
    book.record(SpanTiming("P", 4, 8, 10.0), now=0.0)  # a prefill: not a decode sample
    book.record(SpanTiming("P", 4, 1, 0.4), now=0.0)
    assert book.samples("P", 0.0) == 1 and book.block_seconds("P", 0.0) is None  # not enough samples yet
    book.record(SpanTiming("P", 4, 1, 1.2), now=1.0, rtt=0.4)  # the round trip is the route's, not the node's
    assert book.block_seconds("P", 1.0) == pytest.approx(0.5 * 0.2 + 0.5 * 0.1)
    assert book.believed_block_times(1.0) == pytest.approx({"P": 0.15})
    book.record(SpanTiming("P", 4, 1, float("nan")), now=2.0)  # garbage is not a sample
    assert book.samples("P", 2.0) == 2
    assert book.block_seconds("P", 102.0) is None and book.samples("P", 102.0) == 0  # forgotten


def test_a_node_costs_the_slower_of_its_announcement_and_its_measurement():
    fast_liar = ServerSpan("LIAR", 0, 4, inference_tps=1e9)
    honest = ServerSpan("B", 0, 4, inference_tps=40.0)  # 1/160 s per block
    rng = random.Random(0)
    assert find_route([fast_liar, honest], 0, 4, now=0, rng=rng)[0].peer_id == "LIAR"
    measured = {"LIAR": 0.1}
    assert find_route([fast_liar, honest], 0, 4, now=0, rng=rng, measured=measured)[0].peer_id == "B"
    rtts = {"LIAR": 0.001, "B": 0.001}
    assert route_cost([RouteSpan(fast_liar, 0, 4)], rtts, measured=measured) == pytest.approx(0.401)
    # measured faster than announced: the announcement stands (it is believed only as far as measured)
    assert route_cost([RouteSpan(honest, 0, 4)], rtts, measured={"B": 1e-6}) == pytest.approx(0.001 + 4 / 160)
