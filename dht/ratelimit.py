"""Per-peer request rate limit of a DHT node (sans-IO; time is passed in).

spec/dht.md §7 lets a node answer ERROR ``BUSY`` when it is overloaded; the limits are
implementation policy. Each peer has a token bucket of ``burst`` requests refilled at
``rate`` per second, so one peer flooding requests is refused (cheaply, before its request
is decoded) while every other peer is served as before. Normal traffic stays far below the
defaults of ``DHTConfig``: a lookup sends a handful of requests to each peer it asks.

Buckets are kept for at most ``max_peers`` peers, the least recently active dropped first;
a dropped peer starts again with a full bucket, which is what an idle peer's bucket holds.
"""

from __future__ import annotations

__all__ = ["PeerRateLimiter"]


class PeerRateLimiter:
    """``allow(peer, now)``: True if ``peer`` may make one more request at time ``now`` (seconds)."""

    def __init__(self, rate: float, burst: float, *, max_peers: int = 4096) -> None:
        if rate <= 0 or burst < 1 or max_peers < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_peers >= 1")
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self.refused = 0
        self._buckets: dict[bytes, tuple[float, float]] = {}  # peer -> (tokens, at), least recently active first

    def allow(self, peer: bytes, now: float) -> bool:
        bucket = self._buckets.pop(peer, None)
        if bucket is None:
            tokens = self.burst
        else:
            tokens, at = bucket
            tokens = min(self.burst, tokens + max(0.0, now - at) * self.rate)  # a clock step back adds nothing
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[peer] = (tokens, now)  # re-inserted: now the most recently active
        if len(self._buckets) > self.max_peers:
            del self._buckets[next(iter(self._buckets))]
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
