"""``KeepAlive`` (spec/messages.md §5.9, revision 5), node side: sans-IO, fake clock.

The owner keeps its session from closing as idle while a step of its chain runs elsewhere;
keepalives alone hold a session at most ``max_keepalive_hold`` after its last ``Step``/``Push``
(every peer may be hostile); a ``KeepAlive`` counts only on the session stream of the session it
names (§5.10) and changes nothing else. tests/test_keepalive_chain.py shows the same through real
processes.
"""

from __future__ import annotations

import torch
from test_node_chain_binding import push
from test_node_session_machine import IDLE, SID, UP, done, error, machine, opened, opening, run, step

from biopetals.node.session_machine import EndStream, Send
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import Error, KeepAlive, SessionOpened

HOLD = 100.0


def keepalive(m, now, stream="client", session_id=SID) -> list:
    return m.receive(stream, KeepAlive(session_id=session_id), now)


def closed_as_idle(actions) -> str:
    """The session was closed as idle: ``TIMEOUT`` on its stream, then the stream ends; returns the text."""
    assert [type(a) for a in actions] == [Send, EndStream], actions
    assert isinstance(actions[0].message, Error) and actions[0].message.code == ErrorCode.TIMEOUT
    return actions[0].message.message


def test_the_opened_session_advertises_keepalive():
    m = machine()
    actions = m.open("client", "owner", opening(), 0.0, b"x")
    (reply,) = m.allocated(actions[0].session_id, object(), 0.0)
    assert isinstance(reply.message, SessionOpened) and reply.message.keepalive == 1


def test_keepalives_hold_an_idle_session_open_and_get_no_reply():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, now=0.0)
    assert m.get_timer() == IDLE
    for t in range(3, 60, 3):  # every IDLE / 3 seconds, for six idle timeouts
        assert keepalive(m, float(t)) == []  # no reply (§5.9)
        assert m.get_timer() == t + IDLE and m.handle_timer(t + IDLE - 0.001) == []
    assert SID in m
    # they stop: the session closes IDLE after the last one, as before
    assert m.handle_timer(57.0 + IDLE - 0.001) == []
    assert "idle" in closed_as_idle(m.handle_timer(57.0 + IDLE))
    assert SID not in m and not m.serves("client")


def test_without_keepalives_the_session_closes_as_before():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, now=0.0)
    assert m.handle_timer(IDLE - 0.001) == []
    closed_as_idle(m.handle_timer(IDLE))


def test_keepalives_alone_hold_a_session_at_most_the_hold_after_its_last_step():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, now=0.0)
    done(m, run(m.receive("client", step(1, 0), 1.0)), now=2.0)  # the last work: the step ran at 2.0
    t = 2.0
    while t < 2.0 + HOLD:
        keepalive(m, t)
        t += IDLE / 3
    # a hostile owner keeps sending: the session still closes HOLD after its last step
    assert m.get_timer() == 2.0 + HOLD
    assert m.handle_timer(2.0 + HOLD - 0.001) == []
    keepalive(m, 2.0 + HOLD - 0.5)
    text = closed_as_idle(m.handle_timer(2.0 + HOLD))
    assert "keep" in text and f"{HOLD:g}" in text
    assert SID not in m and m.budget.tokens_left == 100  # its cache is free for others (§5.1)


def test_a_step_or_push_restarts_the_hold():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, now=0.0)
    for t in range(3, 90, 3):
        keepalive(m, float(t))
    done(m, run(m.push("up", UP, push(1, 0), 90.0)), now=91.0)  # a pushed step: new work at 91
    for t in range(93, 180, 3):
        keepalive(m, float(t))
    assert SID in m and m.handle_timer(177.0 + IDLE - 0.001) == []
    assert m.get_timer() == 177.0 + IDLE  # the last keepalive (at 177) + IDLE, well within 91 + HOLD


def test_a_hold_below_the_idle_timeout_gives_keepalives_no_effect():
    m = machine(max_keepalive_hold=0.5 * IDLE)
    opened(m, now=0.0)
    keepalive(m, IDLE - 1.0)
    closed_as_idle(m.handle_timer(IDLE))


def test_keepalive_counts_only_on_its_own_session_stream_and_changes_nothing_else():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, stream="owner-stream", now=0.0)
    opened(m, stream="other-stream", session_id=b"other", now=0.0)
    ran = run(m.receive("owner-stream", step(1, 0), 1.0))
    done(m, ran, now=1.0)
    victim = next(s for s in m.sessions() if s.session_id == SID)
    before = (victim.length, victim.last_step_id, victim.last_activity, victim.last_work, len(victim.inbox),
              victim.upstream, victim.mask)
    # the other session's owner names ours on its own stream: UNKNOWN_SESSION to it, nothing changes
    error(keepalive(m, 8.0, stream="other-stream"), ErrorCode.UNKNOWN_SESSION, to="other-stream")
    assert before == (victim.length, victim.last_step_id, victim.last_activity, victim.last_work, len(victim.inbox),
                      victim.upstream, victim.mask)
    # a session id that is open nowhere: UNKNOWN_SESSION too
    error(keepalive(m, 8.0, stream="owner-stream", session_id=b"nope"), ErrorCode.UNKNOWN_SESSION, to="owner-stream")
    # the owner's own keepalive moves the idle clock only: no cache, position, step id or queue change
    assert keepalive(m, 8.0, stream="owner-stream") == []
    assert (victim.length, victim.last_step_id, victim.last_work, len(victim.inbox), victim.running) == (
        1, 1, 1.0, 0, None)
    assert victim.last_activity == 8.0
    nxt = run(m.receive("owner-stream", step(2, 1), 9.0))  # the next step runs as if nothing happened
    assert nxt.step.position == 1


def test_a_keepalive_while_a_step_runs_or_waits_is_not_queued():
    m = machine(max_keepalive_hold=HOLD)
    opened(m, now=0.0)
    ran = run(m.receive("client", step(1, 0), 0.0))
    for t in range(1, 10):  # more keepalives than max_queued_steps (3): never BUSY, never queued
        assert keepalive(m, float(t)) == []
    assert len(m.sessions()[0].inbox) == 0
    (result,) = [a for a in m.step_done(SID, ran.step_id, torch.zeros(1, 1, 8), 10.0) if isinstance(a, Send)]
    assert result.message.step_id == 1
