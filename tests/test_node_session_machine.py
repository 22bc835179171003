"""The node's session state machine (node/session_machine.py): every session rule, sans-IO, fake clock.

See spec/messages.md §5.1-§5.9 and §2.6. No sockets, no threads, no model: messages go in,
actions come out, time is a number. Streams are plain strings; a "cache" is any object.
tests/test_node_bad_input.py shows the same rules through a real node process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_sans_io import FORBIDDEN, imported_modules

from biopetals.node.budget import CacheBudget
from biopetals.node.session_machine import Allocate, EndStream, NodeRules, PushTo, RunStep, Send, SessionMachine
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.identity import Identity
from biopetals.protocol.messages import (
    CloseSession,
    Error,
    Forward,
    Hop,
    OpenSession,
    Push,
    PushAck,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
)

H = 8
IDLE = 10.0
SID = b"session-1"
NEXT_PEER = Identity.generate().peer_id
UP = Identity.generate().peer_id  # the upstream node every session here names (§5.10)


def machine(**rules) -> SessionMachine:
    args = dict(model="m", start=0, end=4, hidden_size=H, max_positions=64, adapters=("bio",), idle_timeout=IDLE,
                max_queued_steps=3)
    args.update(rules)
    # one byte per block, sequence and position: budgets are easy to read
    return SessionMachine(NodeRules(**args), CacheBudget(4, total_tokens=100, session_tokens=50),
                          lambda start, end, batch, length: (end - start) * batch * length)


def opening(**kw) -> OpenSession:
    args = dict(model="m", start=0, end=4, max_length=10, batch_size=1, codec="f32", session_id=SID, upstream=UP)
    args.update(kw)
    return OpenSession(**args)


def h(tokens=1, batch=1, hidden=H) -> torch.Tensor:
    return torch.full((batch, tokens, hidden), 0.5)


def step(step_id, position, tokens=1, **kw) -> Step:
    return Step(session_id=kw.pop("session_id", SID), step_id=step_id, position=position,
                hidden=kw.pop("hidden", h(tokens)), **kw)


def opened(m: SessionMachine, now=0.0, stream="client", **kw) -> None:
    actions = m.open(stream, "peer", opening(**kw), now, b"fresh")
    assert [type(a) for a in actions] == [Allocate]
    (reply,) = m.allocated(actions[0].session_id, object(), now)
    assert isinstance(reply.message, SessionOpened) and reply.message.idle_timeout == IDLE and reply.to == stream


def sends(actions) -> list:
    return [(a.to, a.message) for a in actions if isinstance(a, Send)]


def error(actions, code, step_id=None, to="client") -> None:
    (sent,) = sends(actions)
    assert sent[0] == to and isinstance(sent[1], Error), actions
    assert sent[1].code == code and sent[1].step_id == step_id and sent[1].message, sent[1]


def run(actions) -> RunStep:
    (action,) = [a for a in actions if isinstance(a, RunStep)]
    return action


def done(m, action: RunStep, now=0.0) -> list:
    return m.step_done(action.session_id, action.step_id, torch.zeros(action.step.hidden.shape), now)


def test_open_checks_in_order_and_reserves_the_cache():
    m = machine()
    for request, code in (
        (opening(model="other"), ErrorCode.MODEL_MISMATCH),
        (opening(start=2, end=6), ErrorCode.BLOCKS_NOT_SERVED),
        (opening(adapter="nope"), ErrorCode.UNKNOWN_ADAPTER),
        (opening(max_length=65), ErrorCode.LIMIT_EXCEEDED),
        (opening(max_length=60), ErrorCode.CACHE_BUDGET),  # 4 blocks x 60 > 50 tokens x 4 bytes
    ):
        actions = m.open("s", "peer", request, 0.0, b"fresh")
        assert isinstance(actions[-1], EndStream)
        error(actions[:1], code, to="s")
    assert m.budget.tokens_left == 100 and len(m) == 0
    opened(m, max_length=10)
    assert m.budget.tokens_left == 90 and len(m) == 1 and SID in m and m.serves("client")
    error(m.open("s2", "peer", opening(), 0.0, b"fresh")[:1], ErrorCode.INVALID_FIELD, to="s2")  # id in use
    # no session id: the node's fresh one; a failed allocation frees the reservation
    (allocate,) = m.open("s3", "peer", opening(session_id=None), 0.0, b"fresh")
    assert allocate.session_id == b"fresh" and b"fresh" not in m  # not open before its cache exists
    failed = m.allocation_failed(b"fresh", Error(code=ErrorCode.CACHE_BUDGET, message="no memory"))
    assert isinstance(failed[-1], EndStream) and m.budget.tokens_left == 90 and not m.serves("s3")


def test_positions_masks_and_step_checks():
    m = machine()
    opened(m)
    first = run(m.receive("client", step(0, 0, 3), 0.0))
    assert first.step.positions.tolist() == [[0, 1, 2]] and first.step.mask is None and not first.step.batchable
    (result,) = sends(done(m, first))
    assert isinstance(result[1], StepResult) and result[1].step_id == 0
    for message, code in (
        (step(1, 2), ErrorCode.BAD_POSITION),  # overlap
        (step(2, 4), ErrorCode.BAD_POSITION),  # gap
        (step(3, 3, 8), ErrorCode.BAD_POSITION),  # past max_length 10
        (step(4, 3, hidden=h(batch=2)), ErrorCode.INVALID_TENSOR),
        (step(5, 3, hidden=h(hidden=H + 1)), ErrorCode.HIDDEN_SIZE_MISMATCH),
        (step(6, 3, prompts=torch.zeros(3, 1, 1, H)), ErrorCode.INVALID_TENSOR),  # prompts for 3 of 4 blocks
    ):
        error(m.receive("client", message, 0.0), code, message.step_id)
    # a padded step: the session remembers its mask, positions count real tokens only (§5.6)
    padded = run(m.receive("client", step(7, 3, 2, mask=torch.tensor([[0, 1]])), 0.0))
    assert padded.step.positions.tolist() == [[0, 3]] and padded.step.mask.tolist() == [[1, 1, 1, 0, 1]]
    done(m, padded)
    decode = run(m.receive("client", step(8, 5), 0.0))
    assert decode.step.positions.tolist() == [[4]] and decode.step.batchable and decode.step.mask.shape == (1, 6)
    # a failed step changes nothing (§2.6): the same position is taken next
    error(m.step_failed(SID, 8, Error(code=ErrorCode.NON_FINITE, message="nan", step_id=8)), ErrorCode.NON_FINITE, 8)
    assert run(m.receive("client", step(9, 5), 0.0)).step.positions.tolist() == [[4]]


def test_duplicates_are_never_run_twice():
    m = machine()
    opened(m)
    first = run(m.receive("client", step(5, 0), 0.0))
    assert m.receive("client", step(5, 0), 0.0) == []  # queued behind the running one...
    done(m, first)  # ...then dropped when its turn comes: no reply at all (§5.7)
    assert m.receive("client", step(4, 1), 0.0) == []  # an older id: a duplicate too
    # a duplicate Push is acknowledged and not run
    assert sends(m.push("upstream", UP, Push(session_id=SID, step_id=5, position=1, hidden=h()), 0.0)) == [
        ("upstream", PushAck(session_id=SID, step_id=5))
    ]
    assert run(m.receive("client", step(6, 1), 0.0)).step.position == 1


def test_push_is_acknowledged_at_once_and_runs_as_a_step_of_the_session():
    m = machine()
    opened(m)
    actions = m.push("upstream", UP, Push(session_id=SID, step_id=0, position=0, hidden=h(2)), 0.0)
    assert sends(actions) == [("upstream", PushAck(session_id=SID, step_id=0))]
    ran = run(actions)
    # the client's own Step for the same id, sent because the push was slow, waits and is dropped
    assert m.receive("client", step(0, 0, 2), 0.0) == []
    (result,) = sends(done(m, ran))
    assert result[0] == "client" and result[1].step_id == 0  # results go to the session's stream
    # unknown session: Error to the pusher, nothing else
    error(m.push("x", UP, Push(session_id=b"nope", step_id=1, position=0, hidden=h()), 0.0),
          ErrorCode.UNKNOWN_SESSION, 1, to="x")


def test_push_on_carries_the_rest_of_the_chain():
    m = machine()
    opened(m)
    hops = (Hop(peer_id=NEXT_PEER, session_id=b"s2", start=4, end=6), Hop(peer_id=NEXT_PEER, session_id=b"s3", start=6, end=8))
    bad = step(0, 0, next=(Hop(peer_id=NEXT_PEER, session_id=b"s2", start=5, end=6),))
    error(m.receive("client", bad, 0.0), ErrorCode.INVALID_FIELD, 0)  # next[0] must start at the session's end
    prompts = torch.arange(8.0).reshape(8, 1, 1, 1).expand(8, 1, 1, H).contiguous()
    mask = torch.tensor([[0, 1]])
    ran = run(m.receive("client", step(1, 0, 2, next=hops, prompts=prompts, mask=mask), 0.0))
    assert torch.equal(ran.step.prompts, prompts[:4])
    out = torch.ones(1, 2, H)
    push_to, send = m.step_done(SID, 1, out, 0.0)
    assert isinstance(push_to, PushTo) and push_to.hop is hops[0] and push_to.codec == "f32"
    push = push_to.push
    assert (push.session_id, push.step_id, push.position, push.next) == (b"s2", 1, 0, hops[1:])
    assert torch.equal(push.hidden, out) and torch.equal(push.prompts, prompts[4:]) and torch.equal(push.mask, mask)
    assert send.to == "client" and isinstance(send.message, StepResult)


def test_idle_timeout_with_a_fake_clock():
    m = machine()
    opened(m, now=100.0)
    assert m.get_timer() == 100.0 + IDLE
    assert m.handle_timer(109.9) == []
    ran = run(m.receive("client", step(0, 0), 105.0))  # a step is activity...
    assert m.get_timer() is None  # ...and a running step keeps the session alive
    assert m.handle_timer(200.0) == []
    done(m, ran, now=201.0)
    assert m.get_timer() == 201.0 + IDLE
    m.push("up", UP, Push(session_id=SID, step_id=0, position=1, hidden=h()), 205.0)  # a duplicate push: alive
    assert m.get_timer() == 205.0 + IDLE
    actions = m.handle_timer(215.0)
    assert isinstance(actions[-1], EndStream) and actions[-1].to == "client"
    error(actions[:1], ErrorCode.TIMEOUT)
    assert len(m) == 0 and m.budget.tokens_left == 100 and m.get_timer() is None
    error(m.push("up", UP, Push(session_id=SID, step_id=1, position=1, hidden=h()), 216.0), ErrorCode.UNKNOWN_SESSION, 1, to="up")


def test_closing_after_running_steps_and_when_the_client_leaves():
    m = machine()
    opened(m)
    error(m.receive("client", CloseSession(session_id=b"other"), 0.0), ErrorCode.UNKNOWN_SESSION)
    ran = run(m.receive("client", step(0, 0), 0.0))
    assert m.receive("client", CloseSession(session_id=SID), 0.0) == []  # waits for the running step
    actions = done(m, ran)
    assert [type(msg) for _, msg in sends(actions)] == [StepResult, SessionClosed] and isinstance(actions[-1], EndStream)
    assert len(m) == 0 and m.budget.tokens_left == 100 and not m.serves("client")
    # the client leaves while a step runs: everything is freed, the late result goes nowhere
    opened(m)
    ran = run(m.receive("client", step(0, 0), 0.0))
    assert m.stream_closed("client") == [] and m.budget.tokens_left == 100
    assert done(m, ran) == []
    # closing all (the node stops)
    opened(m)
    m.close_all()
    assert len(m) == 0 and m.budget.tokens_left == 100


def test_errors_are_actions_and_a_flood_is_busy():
    m = machine()
    opened(m)
    ran = run(m.receive("client", step(0, 0), 0.0))
    for i in range(1, 4):  # max_queued_steps = 3 wait behind the running step
        assert m.receive("client", step(i, i), 0.0) == []
    error(m.receive("client", step(4, 4), 0.0), ErrorCode.BUSY, 4)
    error(m.push("up", UP, Push(session_id=SID, step_id=5, position=5, hidden=h()), 0.0), ErrorCode.BUSY, 5, to="up")
    # the running step fails: its Error goes to the client, then the next one starts (at the same position)
    failed = m.step_failed(SID, 0, Error(code=ErrorCode.INTERNAL, message="bug", step_id=0))
    error([a for a in failed if isinstance(a, Send)][:1], ErrorCode.INTERNAL, 0)
    # step 1 (position 1) is refused since nothing was stored; steps 2 and 3 as well; nothing runs
    codes = [msg.code for _, msg in sends(failed)]
    assert codes == [ErrorCode.INTERNAL] + [ErrorCode.BAD_POSITION] * 3
    assert run(m.receive("client", step(6, 0), 0.0)).step_id == 6


def test_stateless_rules():
    rules = machine(max_forward_tokens=16).rules
    ok = Forward(model="m", start=1, end=3, codec="f32", hidden=h(4, 2))
    rules.check_stateless(ok)
    for request, code in (
        (Forward(model="m", start=1, end=3, codec="f32", hidden=h(4, 2, H + 1)), ErrorCode.HIDDEN_SIZE_MISMATCH),
        (Forward(model="m", start=3, end=5, codec="f32", hidden=h()), ErrorCode.BLOCKS_NOT_SERVED),
        (Forward(model="m", start=0, end=1, codec="f32", hidden=h(9, 2)), ErrorCode.LIMIT_EXCEEDED),
        (Forward(model="m", start=0, end=1, codec="f32", hidden=h(), adapter="x"), ErrorCode.UNKNOWN_ADAPTER),
    ):
        with pytest.raises(RemoteProtocolError) as info:
            rules.check_stateless(request)
        assert info.value.code == code


@pytest.mark.parametrize("module", ["node/session_machine.py", "node/sessions.py", "node/budget.py", "models/step.py"])
def test_the_session_rules_are_sans_io(module):
    """No event loop, socket or clock below the driver (DESIGN.md; node/handler.py is the driver)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / module).read_text())
    found = [name for _, name in imported_modules(tree) if name.split(".")[0] in FORBIDDEN]
    found += [name for _, name in imported_modules(tree) if name.startswith(("biopetals.transport", "biopetals.node.handler"))]
    assert found == []
