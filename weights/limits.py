"""Per-peer and per-address limits of a weights server (sans-IO; time is passed in).

Serving chunks competes with serving blocks for the node's disk, CPU and uplink, so a
node bounds what it gives away (spec/weights.md §3.4): at most ``per_peer`` requests in
flight per peer, ``per_address`` per source IP address (identities are free to make, so
one host's many peer ids share this one; issue 21, item 7) and ``total`` over all peers
(beyond: ``BUSY``, the fetcher asks another peer), and optionally ``rate`` bytes/s per
peer and per address: token buckets one second deep that may go into debt, so a chunk
larger than a second's worth is sent, then the next one waits.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ServeLimits", "LimitState"]


@dataclass(frozen=True)
class ServeLimits:
    per_peer: int = 4
    per_address: int = 16  # calls in flight from one source IP address, whatever its peer ids
    total: int = 32
    rate: float | None = None  # bytes/s per peer; None: unlimited


class LimitState:
    """Slots and rate buckets of every peer."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.in_flight: dict[bytes, int] = {}
        self.by_address: dict[str, int] = {}  # calls in flight per source address
        self.total = 0
        self.refused = 0
        self._buckets: dict[bytes | str, tuple[float, float]] = {}  # peer or address -> (tokens, at)

    def acquire(self, peer: bytes, address: str | None = None) -> bool:
        """Take a slot for one request of ``peer`` from ``address`` (None: unknown, not counted);
        False (counted as refused) if none is free."""
        mine = self.in_flight.get(peer, 0)
        host = self.by_address.get(address, 0) if address is not None else 0
        if mine >= self.limits.per_peer or host >= self.limits.per_address or self.total >= self.limits.total:
            self.refused += 1
            return False
        self.in_flight[peer] = mine + 1
        if address is not None:
            self.by_address[address] = host + 1
        self.total += 1
        return True

    def release(self, peer: bytes, address: str | None = None) -> None:
        _decrement(self.in_flight, peer)
        if address is not None:
            _decrement(self.by_address, address)
        self.total -= 1

    def delay(self, peer: bytes, size: int, now: float, address: str | None = None) -> float:
        """Seconds to wait before sending ``size`` bytes to ``peer`` at ``address`` (0 without a rate)."""
        if self.limits.rate is None:
            return 0.0
        return max(self._take(key, size, now) for key in (peer, address) if key is not None)

    def _take(self, key: bytes | str, size: int, now: float) -> float:
        rate = self.limits.rate
        tokens, at = self._buckets.get(key, (rate, now))
        tokens = min(rate, tokens + max(0.0, now - at) * rate) - size
        self._buckets[key] = (tokens, now)
        return max(0.0, -tokens / rate)


def _decrement(counts: dict, key) -> None:
    left = counts.get(key, 0) - 1
    if left <= 0:
        counts.pop(key, None)
    else:
        counts[key] = left
