"""Which sessions of a chain need a ``KeepAlive`` now (spec/messages.md §5.9.1), without I/O.

While a step's results are awaited, a node whose session only waits for a ``Push`` (or whose
part of the step is done while the later nodes compute) hears nothing from its chain; past
its ``idle_timeout`` it would close the session. The client therefore sends ``KeepAlive``
every ``idle_timeout / 3`` seconds (each session's own, from its ``SessionOpened``) to every
session of the chain that advertised ``keepalive``, until the step's results are in.

``KeepAlives`` keeps, per session, when the node last heard from the chain for it (we sent it a
``Step`` or a ``KeepAlive``, or its ``StepResult`` arrived: the node had then just processed a
step) and answers, for a time ``now``, which sessions are due and when the next one will be.
Time is an argument (aioquic's habit); the asyncio driver (client/session.py) asks it only while
it waits for results, never between steps: a user who stops stepping should see the sessions
expire and be replayed later (§5.9), not hold the nodes' caches forever.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

__all__ = ["KeepAlives", "INTERVAL_FRACTION"]

#: A keepalive goes every ``idle_timeout * INTERVAL_FRACTION`` seconds: two may be lost or late
#: before the node's idle clock runs out.
INTERVAL_FRACTION = 1 / 3


@dataclass
class _Entry:
    interval: float
    last: float


class KeepAlives:
    """The keepalive clock of the sessions of one chain (module doc). Keys are the driver's sessions."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}

    def __contains__(self, session: Hashable) -> bool:
        return session in self._entries

    def add(self, session: Hashable, idle_timeout: float, now: float, *, advertised: bool) -> None:
        """A session opened at ``now``; ``advertised``: its ``SessionOpened`` said ``keepalive``, and
        ``idle_timeout`` is the one it said. A session that did not advertise it never gets a
        keepalive (§5.9.1: a client MUST NOT send one; an old node answers ``UNKNOWN_MESSAGE``)."""
        if not advertised:
            return
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0, got {idle_timeout}")
        self._entries[session] = _Entry(idle_timeout * INTERVAL_FRACTION, now)

    def remove(self, session: Hashable) -> None:
        """The session is gone (abandoned, closed, failed)."""
        self._entries.pop(session, None)

    def heard(self, session: Hashable, now: float) -> None:
        """The node's idle clock of ``session`` restarted: we sent it a ``Step`` or ``KeepAlive``, or its
        ``StepResult`` arrived."""
        entry = self._entries.get(session)
        if entry is not None and now > entry.last:
            entry.last = now

    def get_timer(self) -> float | None:
        """When the next keepalive is due (None: no session takes them)."""
        return min((e.last + e.interval for e in self._entries.values()), default=None)

    def due(self, now: float) -> list[Hashable]:
        """The sessions to send a ``KeepAlive`` at ``now``; each counts as sent (``heard``) at ``now``."""
        out = [s for s, e in self._entries.items() if now >= e.last + e.interval]
        for s in out:
            self._entries[s].last = now
        return out
