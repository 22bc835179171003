"""Timing rules of an emulated WAN link (sans-IO): when may a chunk of bytes leave the relay?

One ``LinkSchedule`` is one direction of one relayed TCP connection
(benchmarks/wan_relay.py drives it). The link is a bottleneck of ``rate`` bytes/s
followed by a fixed one-way propagation ``delay``: a chunk that arrives at ``now``
waits for the chunks before it to be sent (first in, first out), takes
``size / rate`` seconds to send, then ``delay`` seconds to arrive. Delivery times
never decrease, so the driver keeps the bytes' order by delivering in arrival order.

No clock, no sockets: ``now`` is an argument (seconds, any monotonic origin), as
in aioquic's core, so the rules are tested with a fake clock (tests/test_wan_relay.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LinkSchedule", "MBIT"]

MBIT = 1e6 / 8  # bytes/s in one Mbit/s


@dataclass(eq=False)  # one object per link: hashed by identity
class LinkSchedule:
    """One direction of one connection: ``delay`` seconds one way, at most ``rate`` bytes/s (None: unlimited)."""

    delay: float = 0.0
    rate: float | None = None
    free_at: float = float("-inf")  # when the bottleneck has sent every chunk accepted so far
    last_due: float = float("-inf")

    def __post_init__(self) -> None:
        if not 0 <= self.delay < float("inf"):
            raise ValueError(f"delay {self.delay!r}: need a finite number of seconds >= 0")
        if self.rate is not None and not 0 < self.rate < float("inf"):
            raise ValueError(f"rate {self.rate!r}: need a finite number of bytes/s > 0, or None")

    def accept(self, now: float, size: int) -> float:
        """A chunk of ``size`` bytes arrived at ``now``: when its last byte reaches the far end."""
        if size < 0:
            raise ValueError("size must be >= 0")
        start = max(now, self.free_at)
        sent = start + (size / self.rate if self.rate else 0.0)
        self.free_at = sent
        due = max(sent + self.delay, self.last_due)  # never before an earlier chunk: the order holds
        self.last_due = due
        return due

    def backlog(self, now: float) -> float:
        """Seconds of sending still queued at the bottleneck at ``now`` (0 when it is idle)."""
        return max(0.0, self.free_at - now)
