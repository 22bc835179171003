"""Per-peer limits of a weights server (sans-IO; time is passed in).

Serving chunks competes with serving blocks for the node's disk, CPU and uplink, so a
node bounds what it gives away (spec/weights.md §3.4): at most ``per_peer`` requests in
flight per peer and ``total`` over all peers (beyond: ``BUSY``, the fetcher asks another
peer), and optionally ``rate`` bytes/s per peer: a token bucket one second deep that may
go into debt, so a chunk larger than a second's worth is sent, then the next one waits.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeLimits", "LimitState"]


@dataclass(frozen=True)
class ServeLimits:
    per_peer: int = 4
    total: int = 32
    rate: float | None = None  # bytes/s per peer; None: unlimited


class LimitState:
    """Slots and rate buckets of every peer."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.in_flight: dict[bytes, int] = {}
        self.total = 0
        self.refused = 0
        self._buckets: dict[bytes, tuple[float, float]] = {}  # peer -> (tokens, at)

    def acquire(self, peer: bytes) -> bool:
        """Take a slot for one request of ``peer``; False (counted as refused) if none is free."""
        mine = self.in_flight.get(peer, 0)
        if mine >= self.limits.per_peer or self.total >= self.limits.total:
            self.refused += 1
            return False
        self.in_flight[peer] = mine + 1
        self.total += 1
        return True

    def release(self, peer: bytes) -> None:
        mine = self.in_flight.get(peer, 0) - 1
        if mine <= 0:
            self.in_flight.pop(peer, None)
        else:
            self.in_flight[peer] = mine
        self.total -= 1

    def delay(self, peer: bytes, size: int, now: float) -> float:
        """Seconds to wait before sending ``size`` bytes to ``peer`` (0 without a rate)."""
        rate = self.limits.rate
        if rate is None:
            return 0.0
        tokens, at = self._buckets.get(peer, (rate, now))
        tokens = min(rate, tokens + max(0.0, now - at) * rate) - size
        self._buckets[peer] = (tokens, now)
        return max(0.0, -tokens / rate)
