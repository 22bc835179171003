"""The client's chain state (client/chain.py) without I/O: failover, stalls, duplicates, positions, replay.

A small simulated swarm drives ``SessionChain`` and ``CallChain`` with a fake clock:
fake nodes keep a session's columns (and refuse a step at the wrong position, as
spec/messages.md §5.6 says), drop duplicate step ids (§5.7), push to the next hop and
answer after a delay; a killed node's sessions fail at once, a stalled one says
nothing. Each test runs in milliseconds; tests/test_client_generate.py shows the
asyncio drivers wire the same state to real node processes.
"""

from __future__ import annotations

import heapq
import itertools
from pathlib import Path

import pytest
import torch

from biopetals.client.chain import (Abandon, Avoid, CallBackward, CallChain, CallForward, ChainSpan, Finished,
                                    OpenSpans, Rebind, Route, SendStep, SessionChain, WaitResult)
from biopetals.client.errors import PeerFailure, RequestError, SwarmError
from biopetals.client.routing import MissingBlocksError, RouteSpan, ServerSpan, missing_ranges
from biopetals.protocol.errors import ErrorCode

from test_sans_io import violations

DEADLINE = 1.0  # s, every span's result of every step (the fake deadline rule)


class FakeNode:
    def __init__(self, name: str, start: int, end: int, delay: float = 0.01) -> None:
        self.server = ServerSpan(name, start, end)
        self.delay = delay
        self.dead = False
        self.stalled = False
        self.lose_pushes = 0  # the next n pushes to this node get lost
        self.answer: str | None = None  # "wrong-shape", "limit", "extra": a misbehaving answer
        self.rollback = True  # its sessions accept ``truncate`` (§5.6.1); False: a revision-3 node
        self.sessions: list[FakeSession] = []


class FakeSession:
    """A node's session: its columns (one entry per step: step id, position, tokens) and last step id."""

    def __init__(self, sim: "Sim", node: FakeNode, span: ChainSpan, upstream: str | None = None) -> None:
        self.sim, self.node, self.span = sim, node, span
        self.upstream = upstream  # the one node whose pushes count (§5.10)
        self.refused: list[str] = []  # pushers refused FORBIDDEN (nothing reaches the client)
        self.steps: list[tuple[int, int, int]] = []
        self.prompts: list[tuple[int, ...] | None] = []

    @property
    def columns(self) -> int:
        return sum(t for _, _, t in self.steps)

    def run(self, step_id: int, position: int, x: torch.Tensor, hops: tuple[ChainSpan, ...], prompts, at: float,
            pushed_by: str | None = None, truncate: bool = False) -> None:
        node, pushed = self.node, pushed_by is not None
        if node.dead or node.stalled or self.span.abandoned:
            return
        if pushed and pushed_by != self.upstream:
            self.refused.append(pushed_by)
            return
        if pushed and node.lose_pushes:
            node.lose_pushes -= 1
            return
        if self.steps and step_id <= self.steps[-1][0]:
            return  # duplicate: never run twice, answer nothing (§5.7)
        if truncate and node.rollback and position <= self.columns:  # a rollback (§5.6.1)
            self.steps = [(i, p, min(t, position - p)) for i, p, t in self.steps if p < position]
        if position != self.columns:
            self.sim.at(at, self.span, PeerFailure(node.server.peer_id, "BAD_POSITION", int(ErrorCode.BAD_POSITION)))
            return
        if node.answer == "limit":
            self.sim.at(at, self.span, PeerFailure(node.server.peer_id, "LIMIT_EXCEEDED", int(ErrorCode.LIMIT_EXCEEDED)))
            return
        self.steps.append((step_id, position, int(x.shape[1])))
        self.prompts.append(None if prompts is None else tuple(prompts.shape))
        out = x + (self.span.end - self.span.start)  # each block adds 1
        done = at + node.delay
        self.sim.at(done, self.span, (step_id, out[:, :1] if node.answer == "wrong-shape" else out))
        if node.answer == "extra":
            self.sim.at(done, self.span, (step_id + 1000, out))
        if hops:
            rest = None if prompts is None else prompts[self.span.end - self.span.start:]
            hops[0].handle.run(step_id, position, out, hops[1:], rest, done, pushed_by=node.server.peer_id,
                               truncate=truncate)


class Sim:
    """The driver of the tests: does what the state says, with a fake clock and fake nodes."""

    def __init__(self, *nodes: FakeNode) -> None:
        self.nodes = list(nodes)
        self.now = 0.0
        self.banned: set[str] = set()
        self.log: list[object] = []  # every action done, in order
        self._events: list = []
        self._seq = itertools.count()

    def node(self, name: str) -> FakeNode:
        return next(n for n in self.nodes if n.server.peer_id == name)

    def at(self, t: float, span: ChainSpan, event) -> None:
        heapq.heappush(self._events, (t, next(self._seq), span, event))

    def kill(self, name: str) -> None:
        node = self.node(name)
        node.dead = True
        for s in node.sessions:
            self.at(self.now, s.span, PeerFailure(name, "the node closed the session stream",
                                                  int(ErrorCode.CONNECTION_CLOSED)))

    def route(self, start: int, end: int) -> list[RouteSpan]:
        usable = [n.server for n in self.nodes if n.server.peer_id not in self.banned]
        missing = missing_ranges(usable, start, end)
        if missing:
            raise MissingBlocksError(missing, [n.server for n in self.nodes])
        route, b = [], start
        while b < end:
            s = next(s for s in usable if s.start <= b < s.end)
            route.append(RouteSpan(s, b, min(s.end, end)))
            b = min(s.end, end)
        return route

    def drive(self, state) -> object:
        while True:
            a = state.action
            self.log.append(a)
            if isinstance(a, Finished):
                return a.value
            if isinstance(a, OpenSpans):
                try:
                    route = self.route(a.start, a.end)
                except MissingBlocksError as exc:
                    state.no_route(exc, self.now)
                    continue
                spans, failures = [], []
                for r, upstream in zip(route, a.upstreams([r.peer_id for r in route])):
                    node = self.node(r.peer_id)
                    if node.dead:
                        failures.append(PeerFailure(r.peer_id, "connection refused", int(ErrorCode.CONNECTION_CLOSED)))
                        continue
                    span = ChainSpan(r.server, r.start, r.end, rollback=node.rollback)
                    span.handle = FakeSession(self, node, span, upstream)
                    node.sessions.append(span.handle)
                    spans.append(span)
                state.opened(spans, failures, self.now)
            elif isinstance(a, SendStep):
                a.span.handle.run(a.step_id, a.position, a.hidden, a.hops, a.prompts, self.now, truncate=a.truncate)
                state.done(self.now)
            elif isinstance(a, WaitResult):
                if self._events and self._events[0][0] <= a.deadline:
                    t, _, span, event = heapq.heappop(self._events)
                    self.now = max(self.now, t)
                    if isinstance(event, PeerFailure):
                        state.span_failed(span, event, self.now)
                    else:
                        state.result(span, event[0], event[1], self.now)
                else:
                    self.now = a.deadline
                    state.handle_timer(self.now)
            elif isinstance(a, Rebind):
                a.span.handle.upstream = a.upstream
                state.done(self.now)
            elif isinstance(a, (Abandon, Avoid)):
                if isinstance(a, Avoid):
                    self.banned.add(a.failure.peer_id)
                state.done(self.now)
            else:
                raise AssertionError(a)

    def sends(self) -> list[SendStep]:
        return [a for a in self.log if isinstance(a, SendStep)]

    def avoided(self) -> list[PeerFailure]:
        return [a.failure for a in self.log if isinstance(a, Avoid)]


def chain(max_length: int = 64, batch: int = 1, **kwargs) -> SessionChain:
    return SessionChain(8, max_length, batch, deadline=lambda *_: DEADLINE, **kwargs)


def step(sim: Sim, state: SessionChain, tokens: int = 1, prompts=None, mask=None) -> torch.Tensor:
    x = torch.arange(state.batch_size * tokens * 2, dtype=torch.float32).reshape(state.batch_size, tokens, 2)
    state.step(x, mask, prompts, sim.now)
    out = sim.drive(state)
    assert torch.equal(out, x + 8)  # through all 8 blocks, whatever the route
    return out


def three_spans(*extra: FakeNode) -> Sim:
    return Sim(FakeNode("A", 0, 3), FakeNode("B", 3, 6), FakeNode("C", 6, 8), *extra)


def columns(sim: Sim, name: str) -> list[tuple[int, int, int]]:
    return [s.steps for s in sim.node(name).sessions][-1]


@pytest.mark.parametrize("name", ["chain.py", "routing.py", "errors.py"])
def test_the_chain_state_is_sans_io(name):
    """No event loop, socket or clock in the chain state and what it imports (time is an argument)."""
    assert violations(Path(__file__).resolve().parent.parent / "client" / name) == []


# ---------------------------------------------------------------------------------------- steps and positions


def test_a_step_goes_to_the_first_node_with_push_and_every_span_answers():
    sim, state = three_spans(), chain()
    step(sim, state, tokens=4)
    step(sim, state)
    sends = sim.sends()
    assert [(a.span.peer_id, a.step_id, a.position, [h.peer_id for h in a.hops]) for a in sends] == [
        ("A", 1, 0, ["B", "C"]), ("A", 5, 4, ["B", "C"])]
    assert state.position == 5 and state.failovers == 0
    for name in "ABC":
        assert columns(sim, name) == [(1, 0, 4), (5, 4, 1)]
    # the history holds each span's own inputs: B was fed A's outputs (3 blocks added)
    b = state.spans[1]
    assert [f.step_id for f in b.history] == [1, 5]
    assert torch.equal(b.history[0].hidden, torch.arange(8.0).reshape(1, 4, 2) + 3)
    assert all(0 < t <= 0.05 for s in state.spans for t in s.step_seconds)  # measured per span


def test_invalid_steps_are_refused_before_anything_is_sent():
    sim, state = three_spans(), chain(max_length=4, batch=2)
    with pytest.raises(ValueError, match="holds 2 sequence"):
        state.step(torch.zeros(1, 1, 2), None, None, 0.0)
    with pytest.raises(ValueError, match="max_length is 4"):
        state.step(torch.zeros(2, 5, 2), None, None, 0.0)
    with pytest.raises(ValueError, match="mask must be"):
        state.step(torch.zeros(2, 1, 2), torch.ones(2, 3), None, 0.0)
    with pytest.raises(ValueError, match="prompts must be"):
        state.step(torch.zeros(2, 1, 2), None, torch.zeros(8, 2, 2, 2), 0.0)
    assert state.action is None and not sim.log
    step(sim, state, tokens=3)
    with pytest.raises(ValueError, match="3 tokens so far plus 2"):
        state.step(torch.zeros(2, 2, 2), None, None, sim.now)
    assert state.position == 3


def test_an_all_ones_mask_is_no_mask_and_a_padding_mask_travels_with_the_step():
    sim, state = three_spans(), chain(batch=2)
    step(sim, state, tokens=2, mask=torch.ones(2, 2))
    step(sim, state, tokens=2, mask=torch.tensor([[0, 1], [1, 1]]))
    first, second = sim.sends()
    assert first.mask is None
    assert second.mask.dtype == torch.bool and second.mask.tolist() == [[False, True], [True, True]]


# ---------------------------------------------------------------------------------------- failover


def test_a_killed_node_is_avoided_and_replaced_with_its_history_replayed():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state, tokens=3)
    step(sim, state)
    sim.kill("B")
    step(sim, state)
    assert [f.peer_id for f in sim.avoided()] == ["B"]
    assert sim.avoided()[0].code == ErrorCode.CONNECTION_CLOSED
    assert [s.peer_id for s in state.spans] == ["A", "B2", "C"] and state.failovers == 1
    # the replacement got B's history in its chunks, positions and step ids, then the step
    assert columns(sim, "B2") == columns(sim, "B") + [(5, 4, 1)] == [(1, 0, 3), (4, 3, 1), (5, 4, 1)]
    replays = [a for a in sim.sends() if a.span.peer_id == "B2"]
    assert [(a.step_id, a.position, len(a.hops)) for a in replays] == [(1, 0, 0), (4, 3, 0), (5, 4, 1)]
    assert columns(sim, "C") == [(1, 0, 3), (4, 3, 1), (5, 4, 1)]  # C ran each step once
    assert [a for a in sim.log if isinstance(a, Abandon)][0].spans[0].peer_id == "B"
    step(sim, state)
    assert state.position == 6


def test_sessions_are_bound_to_their_chain_and_a_replacement_rebinds_the_next():
    """spec/messages.md §5.10: each session names the node before it; after B is replaced by B2, C is told
    that B2 pushes into it (before the step is resent), so no push is refused and C is never asked directly."""
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state)
    assert [s.handle.upstream for s in state.spans] == [None, "A", "B"]
    sim.kill("B")
    step(sim, state)
    step(sim, state)
    rebinds = [a for a in sim.log if isinstance(a, Rebind)]
    assert [(a.span.peer_id, a.upstream) for a in rebinds] == [("C", "B2")]
    assert [s.handle.upstream for s in state.spans] == [None, "A", "B2"]
    assert all(not s.refused for n in sim.nodes for s in n.sessions)
    assert [a.step_id for a in sim.sends() if a.span.peer_id == "C"] == []  # every step reached C by push
    assert columns(sim, "C") == [(1, 0, 1), (2, 1, 1), (3, 2, 1)]
    # without push, no session names an upstream and nothing is rebound
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain(use_push=False)
    step(sim, state)
    sim.kill("B")
    step(sim, state)
    assert [s.handle.upstream for s in state.spans] == [None, None, None]
    assert not [a for a in sim.log if isinstance(a, Rebind)]


def test_a_stalled_node_is_asked_directly_once_then_replaced_at_its_deadline():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state, tokens=2)
    sim.node("B").stalled = True
    t0 = sim.now
    step(sim, state)
    b_sends = [a for a in sim.sends() if a.span.peer_id == "B"]
    assert [a.step_id for a in b_sends] == [3]  # it got the step by push, then from us once
    assert [(f.peer_id, f.code) for f in sim.avoided()] == [("B", ErrorCode.TIMEOUT)]
    assert "within 1.0 s" in sim.avoided()[0].reason
    assert [s.peer_id for s in state.spans] == ["A", "B2", "C"]
    assert 2 * DEADLINE <= sim.now - t0 < 2 * DEADLINE + 0.2  # two missed deadlines, then the replay


def test_a_slow_node_within_its_deadline_is_kept_and_measured():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    sim.node("B").delay = 0.9 * DEADLINE
    step(sim, state)
    step(sim, state)
    assert not sim.avoided() and state.failovers == 0
    # from the step's send to B's result: A's 0.01 s, then B's 0.9 s
    assert state.spans[1].step_seconds == pytest.approx([0.9 * DEADLINE + 0.01] * 2)


def test_a_lost_push_is_asked_for_directly_and_the_node_is_kept():
    sim, state = three_spans(), chain()
    sim.node("C").lose_pushes = 1
    step(sim, state)
    assert [(a.span.peer_id, a.step_id) for a in sim.sends()] == [("A", 1), ("C", 1)]
    assert not sim.avoided() and columns(sim, "C") == [(1, 0, 1)]


def test_a_result_for_a_step_not_asked_for_is_the_nodes_failure():
    sim, state = three_spans(FakeNode("C2", 6, 8)), chain()
    step(sim, state)
    sim.node("C").answer = "extra"  # also answers a step id nobody sent
    step(sim, state)
    step(sim, state)
    assert [(f.peer_id, f.code) for f in sim.avoided()] == [("C", ErrorCode.INVALID_FIELD)]
    assert "not asked for" in sim.avoided()[0].reason
    assert [s.peer_id for s in state.spans] == ["A", "B", "C2"]
    assert [s for s, _, _ in columns(sim, "C2")] == [1, 2, 3]


def test_a_duplicate_result_is_not_used_twice():
    state = chain()
    span = ChainSpan(ServerSpan("A", 0, 8), 0, 8)
    state.spans = [span]
    state.step(torch.zeros(1, 1, 2), None, None, 0.0)
    assert isinstance(state.action, SendStep)
    state.done(0.0)
    state.result(span, 1, torch.ones(1, 1, 2), 0.1)
    assert isinstance(state.action, Finished) and state.position == 1
    state.result(span, 1, torch.ones(1, 1, 2), 0.2)  # the same answer again: not asked for
    assert span.failure is not None and span.failure.code == ErrorCode.INVALID_FIELD


def test_a_result_of_the_wrong_shape_is_a_node_failure_not_an_abort():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    sim.node("B").answer = "wrong-shape"
    step(sim, state, tokens=2)
    assert [(f.peer_id, f.code) for f in sim.avoided()] == [("B", ErrorCode.INVALID_TENSOR)]
    assert [s.peer_id for s in state.spans] == ["A", "B2", "C"]


def test_replay_onto_a_replacement_split_over_two_nodes_gives_each_its_prompts():
    sim = Sim(FakeNode("A", 0, 3), FakeNode("B", 3, 8), FakeNode("B1", 3, 5), FakeNode("B2", 5, 8))
    state = chain()
    prompts = torch.zeros(8, 1, 1, 2)
    step(sim, state, tokens=2, prompts=prompts)
    step(sim, state, prompts=prompts)
    sim.kill("B")
    step(sim, state, prompts=prompts)
    assert [(s.peer_id, s.start, s.end) for s in state.spans] == [("A", 0, 3), ("B1", 3, 5), ("B2", 5, 8)]
    assert columns(sim, "B1") == columns(sim, "B2") == [(1, 0, 2), (3, 2, 1), (4, 3, 1)]
    # each part of the replay got its own blocks' prompts: 2 blocks for B1, 3 for B2
    assert sim.node("B1").sessions[0].prompts == [(2, 1, 1, 2)] * 2 + [(5, 1, 1, 2)]
    assert sim.node("B2").sessions[0].prompts == [(3, 1, 1, 2)] * 3
    assert [len(s.history) for s in state.spans] == [3, 3, 3]


def test_a_replacement_that_fails_during_the_replay_is_replaced_too():
    sim = three_spans(FakeNode("B2", 3, 6), FakeNode("B3", 3, 6))
    state = chain()
    step(sim, state, tokens=2)
    sim.kill("B")
    sim.node("B2").stalled = True
    step(sim, state)
    assert [f.peer_id for f in sim.avoided()] == ["B", "B2"]
    assert [s.peer_id for s in state.spans] == ["A", "B3", "C"] and state.failovers == 1


def test_an_exhausted_budget_names_the_blocks_and_each_peer_once():
    replicas = [FakeNode(f"B{i}", 3, 6) for i in range(5)]
    sim, state = three_spans(*replicas), chain(max_failovers=3)
    step(sim, state)
    for n in ["B", *[r.server.peer_id for r in replicas]]:
        sim.node(n).stalled = True
    sim.kill("B")
    with pytest.raises(SwarmError) as info:
        step(sim, state)
    text = str(info.value)
    assert "failed 4 times: no live node for blocks 3:6" in text
    assert text.count("peer B:") == 1 and text.count("peer B0:") == 1, text
    assert not state.busy


def test_no_node_left_names_the_missing_blocks_once():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    step(sim, state)
    sim.kill("B")
    sim.kill("B2")
    with pytest.raises(SwarmError) as info:
        step(sim, state)
    text = str(info.value)
    assert "failed 2 times: no live node for blocks 3:6" in text and "no usable node serves block(s) 3:6" in text
    assert text.count("peer B:") == 1 and text.count("peer B2:") == 1, text


def test_a_first_open_without_a_route_raises_missing_blocks():
    sim, state = Sim(FakeNode("A", 0, 3)), chain()
    state.open(0.0)
    with pytest.raises(MissingBlocksError):
        sim.drive(state)


def test_a_request_over_a_limit_is_raised_at_once_and_no_node_is_avoided():
    sim, state = three_spans(FakeNode("B2", 3, 6)), chain()
    sim.node("B").answer = "limit"
    with pytest.raises(RequestError, match="smaller batch"):
        step(sim, state)
    assert not sim.avoided()
    # our own encoder refusing the message: the same, before any node sees it
    state = chain()
    span = ChainSpan(ServerSpan("A", 0, 8), 0, 8)
    state.spans = [span]
    state.step(torch.zeros(1, 1, 2), None, None, 0.0)
    with pytest.raises(RequestError, match="refused before sending"):
        state.span_failed(span, PeerFailure("A", "LIMIT_EXCEEDED: too big", int(ErrorCode.LIMIT_EXCEEDED),
                                            local=True), 0.0)


def test_the_timer_is_the_pending_deadline_only():
    state = chain()
    span = ChainSpan(ServerSpan("A", 0, 8), 0, 8)
    state.spans = [span]
    assert state.get_timer() is None
    state.step(torch.zeros(1, 1, 2), None, None, 10.0)
    assert state.get_timer() == 10.0 + DEADLINE
    state.done(10.0)
    assert isinstance(state.action, WaitResult)
    state.handle_timer(10.5)  # not due yet: nothing happens
    assert isinstance(state.action, WaitResult)
    state.result(span, 1, torch.zeros(1, 1, 2), 10.6)
    assert isinstance(state.action, Finished) and state.get_timer() is None


# ---------------------------------------------------------------------------------------- forward / backward


class CallSim:
    """Stateless calls: a node's Forward doubles its input, its Backward doubles the gradient."""

    def __init__(self, *nodes: tuple[str, int, int], failing: set[str] = frozenset()) -> None:
        self.servers = [ServerSpan(*n) for n in nodes]
        self.failing = set(failing)
        self.banned: set[str] = set()
        self.log: list[object] = []

    def drive(self, c: CallChain):
        now = 0.0
        while True:
            a = c.action
            self.log.append(a)
            now += 0.001
            if isinstance(a, Finished):
                return a.value
            if isinstance(a, Route):
                usable = [s for s in self.servers if s.peer_id not in self.banned]
                route, b = [], a.start
                while b < a.end:
                    s = next(s for s in usable if s.start <= b < s.end)
                    route.append(RouteSpan(s, b, min(s.end, a.end)))
                    b = route[-1].end
                c.routed(route, now)
            elif isinstance(a, (CallForward, CallBackward)):
                if a.span.peer_id in self.failing:
                    c.failed(PeerFailure(a.span.peer_id, "connection lost", int(ErrorCode.CONNECTION_CLOSED)), now)
                elif isinstance(a, CallForward):
                    c.returned(a.hidden * 2 ** (a.span.end - a.span.start), now)
                else:
                    gp = None if a.prompts is None else torch.full_like(a.prompts, float(a.span.start))
                    c.returned((a.grad * 2 ** (a.span.end - a.span.start), gp), now)
            elif isinstance(a, Avoid):
                self.banned.add(a.failure.peer_id)
                c.done(now)
            else:
                raise AssertionError(a)


def test_forward_reroutes_from_the_failed_span_and_backward_splits_a_replacement():
    sim = CallSim(("A", 0, 3), ("B", 3, 8), ("B1", 3, 5), ("B2", 5, 8), failing={"B"})
    c = CallChain(8, timeout=5.0)
    x = torch.ones(1, 2, 2)
    prompts = torch.zeros(8, 1, 1, 2)
    c.forward(x, None, prompts, 0.0)
    out, trace = sim.drive(c)
    assert torch.equal(out, x * 2 ** 8)
    assert [(r.peer_id, r.start, r.end) for r, _ in trace] == [("A", 0, 3), ("B1", 3, 5), ("B2", 5, 8)]
    assert [a.start for a in sim.log if isinstance(a, Route)] == [0, 3]  # re-routed from block 3 only
    # backward through a span whose node then fails: its blocks re-routed over two nodes
    sim.failing, sim.banned = {"B2"}, set()
    sim.servers = [s for s in sim.servers if s.peer_id != "B"] + [ServerSpan("C", 5, 6), ServerSpan("D", 6, 8)]
    c.backward(trace, torch.ones(1, 2, 2), None, prompts, 1.0)
    grad, grad_prompts = sim.drive(c)
    assert torch.equal(grad, torch.ones(1, 2, 2) * 2 ** 8)
    assert [grad_prompts[b].max().item() for b in range(8)] == [0, 0, 0, 3, 3, 5, 6, 6]
    calls = [(type(a).__name__[4], a.span.peer_id) for a in sim.log if isinstance(a, (CallForward, CallBackward))]
    # B2 failed; C's input comes from a Forward on C, then Backward on D, C, and on
    assert calls[-6:] == [("B", "B2"), ("F", "C"), ("B", "D"), ("B", "C"), ("B", "B1"), ("B", "A")]


def test_a_call_past_its_deadline_is_a_stall_and_the_budget_ends_the_pass():
    c = CallChain(8, timeout=5.0, max_failovers=1)
    c.forward(torch.ones(1, 1, 2), None, None, 0.0)
    c.routed([RouteSpan(ServerSpan("A", 0, 8), 0, 8)], 0.0)
    assert c.get_timer() == 5.0
    c.handle_timer(5.0)
    assert isinstance(c.action, Avoid) and c.action.stalled
    c.done(5.0)
    c.routed([RouteSpan(ServerSpan("B", 0, 8), 0, 8)], 5.0)
    c.failed(PeerFailure("B", "connection lost"), 6.0)
    assert isinstance(c.action, Avoid)  # the node is avoided, then the budget is spent
    with pytest.raises(SwarmError, match="the forward pass failed 2 times: no live node for blocks 0:8"):
        c.done(6.0)
    assert not c.busy


def test_which_failures_the_request_caused():
    from biopetals.client.errors import peer_failure_from
    from biopetals.protocol.errors import LocalProtocolError, RemoteProtocolError

    ours = peer_failure_from("A", LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, "shape [1, 4200, 4096] is over"))
    assert ours.by_request and ours.local
    assert PeerFailure("A", "LIMIT_EXCEEDED", int(ErrorCode.LIMIT_EXCEEDED)).by_request  # any node would say it
    for code in (ErrorCode.INVALID_TENSOR, ErrorCode.BAD_POSITION, ErrorCode.TIMEOUT, None):
        # our request passed our own checks: the node's answer is about the node
        assert not PeerFailure("A", "x", None if code is None else int(code)).by_request
    assert not peer_failure_from("A", RemoteProtocolError(ErrorCode.INVALID_TENSOR, "bad")).by_request
    # a node's answer that breaks the protocol is the node's failure, whatever its code (§2.6): a
    # StepResult over a limit does not decode with LIMIT_EXCEEDED, and must not end the request
    theirs = peer_failure_from("A", RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, "StepResult.hidden over the limit"))
    assert not theirs.by_request and theirs.invalid
    assert not peer_failure_from("A", RemoteProtocolError(ErrorCode.NON_FINITE, "NaN in a StepResult")).by_request


def test_backward_answers_of_the_wrong_shape_are_node_failures():
    """The chain state checks every Forward/Backward answer (client/swarm.py only carries them): grad_inputs of
    the wrong shape, or grad_prompts for a call that sent no prompts, make the node avoided."""
    x = torch.ones(1, 2, 2)
    for bad in ((torch.ones(1, 1, 2), None), (torch.ones(1, 2, 2), torch.zeros(8, 1, 1, 2))):
        c = CallChain(8, timeout=5.0)
        c.forward(x, None, None, 0.0)
        c.routed([RouteSpan(ServerSpan("A", 0, 8), 0, 8)], 0.0)
        c.returned(x, 0.1)
        assert isinstance(c.action, Finished)
        _, trace = c.action.value
        c.backward(trace, torch.ones(1, 2, 2), None, None, 1.0)
        assert isinstance(c.action, CallBackward)
        c.returned(bad, 1.1)
        assert isinstance(c.action, Avoid) and c.action.failure.code == ErrorCode.INVALID_TENSOR, c.action
