"""The client's keepalive clock (client/keepalive.py, spec/messages.md §5.9.1): sans-IO, fake clock.

Which sessions of a chain need a ``KeepAlive`` at time ``t``: every session that advertised it,
``idle_timeout / 3`` after the node last heard from the chain for it (a ``Step`` or ``KeepAlive``
we sent, a ``StepResult`` that arrived), each by its own advertised timeout; sessions that did not
advertise it never. tests/test_keepalive_chain.py shows the driver doing it through real processes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_sans_io import FORBIDDEN, imported_modules

from biopetals.client.keepalive import KeepAlives


def test_no_session_no_timer():
    k = KeepAlives()
    assert k.get_timer() is None and k.due(1e9) == []


def test_each_session_is_due_a_third_of_its_own_idle_timeout_after_it_was_last_heard():
    k = KeepAlives()
    k.add("first", 60.0, now=0.0, advertised=True)  # its node got the Step at 0 and computes for minutes
    k.add("second", 30.0, now=0.0, advertised=True)  # waits for the push
    assert k.get_timer() == 10.0
    assert k.due(9.999) == []
    assert k.due(10.0) == ["second"]  # counted as sent at 10
    assert k.get_timer() == 20.0 and k.due(20.0) == ["first", "second"]
    assert k.due(25.0) == [] and k.get_timer() == 30.0


def test_a_step_or_a_result_counts_as_heard():
    k = KeepAlives()
    k.add("s", 30.0, now=0.0, advertised=True)
    k.heard("s", 8.0)  # its StepResult arrived at 8: the node had just processed a step
    assert k.get_timer() == 18.0 and k.due(17.0) == []
    k.heard("s", 5.0)  # an older report moves nothing back
    assert k.get_timer() == 18.0
    assert k.due(18.0) == ["s"]


def test_a_long_step_gets_keepalives_all_along():
    """A 100 s step through a chain of 3 sessions (idle 6 s): every session hears from us at least
    every 2 s, so none comes near its idle timeout."""
    k = KeepAlives()
    for name in ("a", "b", "c"):
        k.add(name, 6.0, now=0.0, advertised=True)
    last = {"a": 0.0, "b": 0.0, "c": 0.0}
    now = 0.0
    while now < 100.0:
        now = k.get_timer()
        for name in k.due(now):
            assert now - last[name] <= 6.0 / 3 + 1e-9
            last[name] = now
    assert all(now - t <= 2.0 for t in last.values())


def test_a_session_that_did_not_advertise_keepalive_never_gets_one():
    """spec/messages.md §5.9.1: a client MUST NOT send KeepAlive where SessionOpened lacked keepalive."""
    k = KeepAlives()
    k.add("old-node", 3.0, now=0.0, advertised=False)  # a node of revision 4
    k.add("new-node", 3.0, now=0.0, advertised=True)
    k.heard("old-node", 1.0)
    assert "old-node" not in k
    for t in (1.0, 2.0, 5.0, 100.0):
        assert "old-node" not in k.due(t)
    assert k.get_timer() == 101.0  # the new node's only


def test_removed_sessions_and_sessions_never_added_get_none():
    k = KeepAlives()
    k.add("new", 3.0, now=0.0, advertised=True)
    k.remove("new")
    k.remove("never-added")  # harmless
    k.heard("never-added", 1.0)  # a session that did not advertise keepalive: still none
    assert "never-added" not in k and k.get_timer() is None and k.due(100.0) == []


def test_an_invalid_idle_timeout_is_refused():
    with pytest.raises(ValueError):
        KeepAlives().add("s", 0.0, now=0.0, advertised=True)


def test_the_keepalive_clock_is_sans_io():
    path = Path(__file__).resolve().parent.parent / "client" / "keepalive.py"
    found = [name for _, name in imported_modules(ast.parse(path.read_text())) if name.split(".")[0] in FORBIDDEN]
    assert found == []
