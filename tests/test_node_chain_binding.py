"""Sessions bound to their chain (spec/messages.md §5.10), node side: sans-IO, fake clock.

Only the owner (on its session stream) and the upstream it names may drive a session.
Each variant of the insider attack of issue 20 is refused with a typed ``Error`` to the
insider and changes nothing: no cache or step-id change, no idle-time change, nothing
sent to the owner. tests/test_chain_binding.py shows the same through real processes.
"""

from __future__ import annotations

import torch
from test_node_session_machine import SID, UP, error, h, machine, opened, opening, run, sends, step

from biopetals.node.session_machine import PushTo, RunStep
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.protocol.messages import CloseSession, Hop, Push, PushAck, SessionOpened, SetUpstream, StepResult

INSIDER = Identity.generate().peer_id  # holds the swarm key: authenticated, but not this session's upstream
NEW_UP = Identity.generate().peer_id
U64_MAX = 2**64 - 1


def push(step_id, position, **kw) -> Push:
    return Push(session_id=kw.pop("session_id", SID), step_id=step_id, position=position, hidden=h(), **kw)


def refused(m, peer, message, now=0.0) -> None:
    """``message`` from ``peer`` is refused with FORBIDDEN, to the pusher only."""
    error(m.push("insider", peer, message, now), ErrorCode.FORBIDDEN, message.step_id, to="insider")


def test_the_opened_session_names_its_upstream():
    m = machine()
    actions = m.open("client", "owner", opening(upstream=UP), 0.0, b"x")
    (reply,) = m.allocated(actions[0].session_id, object(), 0.0)
    assert isinstance(reply.message, SessionOpened) and reply.message.upstream == UP


def test_every_insider_push_variant_is_refused_and_changes_nothing():
    m = machine()
    opened(m, now=0.0)
    ran = run(m.receive("client", step(1, 0), 1.0))
    m.step_done(SID, 1, torch.zeros(1, 1, 8), 1.0)
    session = m.sessions()[0]
    before = (session.length, session.last_step_id, session.last_activity, len(session.inbox), session.running)
    hop = Hop(peer_id=INSIDER, session_id=b"insider-session", start=4, end=8)
    for attack in (
        push(2, 1),  # the victim's next position: would run on the victim's cache, its result to the owner
        push(2, 1, next=(hop,)),  # and push its output, computed over the victim's context, to the insider
        push(U64_MAX, 1),  # would make every later step of the victim a duplicate
        push(3, 7),  # a wrong position: would put BAD_POSITION on the owner's stream
    ):
        refused(m, INSIDER, attack, now=5.0)
    # the owner's own peer is not an upstream either, unless it names itself
    refused(m, "owner", push(2, 1), now=5.0)
    after = (session.length, session.last_step_id, session.last_activity, len(session.inbox), session.running)
    assert after == before and ran.step_id == 1
    assert m.get_timer() == 1.0 + 10.0  # refused pushes are no activity: the idle deadline did not move
    # the victim's next step runs as if nothing happened
    nxt = run(m.receive("client", step(2, 1), 6.0))
    assert nxt.step.position == 1 and nxt.step_id == 2


def test_the_upstream_pushes_and_set_upstream_moves_the_binding():
    m = machine()
    opened(m)
    actions = m.push("up", UP, push(1, 0), 0.0)
    assert sends(actions) == [("up", PushAck(session_id=SID, step_id=1))] and isinstance(actions[-1], RunStep)
    (result,) = sends(m.step_done(SID, 1, torch.zeros(1, 1, 8), 0.0))
    assert result[0] == "client" and isinstance(result[1], StepResult)
    # a failover: the owner names the replacement; from then on only it may push
    assert m.receive("client", SetUpstream(session_id=SID, upstream=NEW_UP), 0.0) == []
    refused(m, UP, push(2, 1))
    assert isinstance(m.push("new-up", NEW_UP, push(2, 1), 0.0)[-1], RunStep)
    # SetUpstream for another session, on this stream: UNKNOWN_SESSION, the binding stays
    error(m.receive("client", SetUpstream(session_id=b"other", upstream=INSIDER), 0.0), ErrorCode.UNKNOWN_SESSION)
    assert m.sessions()[0].upstream == NEW_UP
    # no upstream at all: nobody may push
    m.receive("client", SetUpstream(session_id=SID), 0.0)
    refused(m, NEW_UP, push(3, 2))


def test_a_session_without_upstream_accepts_steps_and_no_push():
    m = machine()
    opened(m, upstream=None)
    refused(m, UP, push(1, 0))
    ran = run(m.receive("client", step(1, 0), 0.0))
    push_to = [a for a in m.step_done(SID, 1, torch.zeros(1, 1, 8), 0.0) if isinstance(a, PushTo)]
    assert ran.step_id == 1 and push_to == []


def test_step_and_close_drive_only_the_session_of_their_stream():
    m = machine()
    opened(m, stream="owner-stream")
    opened(m, stream="other-stream", session_id=b"other")
    # the other session's owner names our session on its own stream: refused, nothing changes
    error(m.receive("other-stream", step(1, 0, session_id=SID), 0.0), ErrorCode.UNKNOWN_SESSION, 1, to="other-stream")
    error(m.receive("other-stream", CloseSession(session_id=SID), 0.0), ErrorCode.UNKNOWN_SESSION, to="other-stream")
    error(m.receive("other-stream", SetUpstream(session_id=SID, upstream=INSIDER), 0.0), ErrorCode.UNKNOWN_SESSION,
          to="other-stream")
    assert SID in m and m.sessions()[0].upstream == UP and m.sessions()[0].length == 0
