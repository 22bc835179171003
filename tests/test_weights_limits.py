"""A weights server's limits (weights/limits.py), sans-IO with a fake clock: per peer, per source address, total, rate."""

from __future__ import annotations

from biopetals.weights.limits import LimitState, ServeLimits


def test_identities_from_one_address_share_its_slots() -> None:
    state = LimitState(ServeLimits(per_peer=2, per_address=3, total=8))
    assert state.acquire(b"a", "10.0.0.1") and state.acquire(b"a", "10.0.0.1")
    assert not state.acquire(b"a", "10.0.0.1")  # its per-peer limit
    assert state.acquire(b"b", "10.0.0.1")
    assert not state.acquire(b"c", "10.0.0.1")  # a fresh identity, the same address: full
    assert state.acquire(b"d", "10.0.0.2") and state.acquire(b"e", None)  # other hosts are not affected
    assert state.refused == 2 and state.by_address == {"10.0.0.1": 3, "10.0.0.2": 1} and state.total == 5
    state.release(b"b", "10.0.0.1")
    assert state.acquire(b"c", "10.0.0.1")
    for peer, address in ((b"a", "10.0.0.1"), (b"a", "10.0.0.1"), (b"c", "10.0.0.1"), (b"d", "10.0.0.2"), (b"e", None)):
        state.release(peer, address)
    assert state.by_address == {} and state.in_flight == {} and state.total == 0


def test_the_rate_holds_per_peer_and_per_address() -> None:
    state = LimitState(ServeLimits(rate=100.0))
    assert state.delay(b"a", 100, 0.0, "h") == 0.0  # one second's worth: at once
    assert state.delay(b"b", 50, 0.0, "h") == 0.5  # a fresh identity pays its address's debt
    assert state.delay(b"c", 50, 0.0, "other") == 0.0
    assert state.delay(b"a", 100, 2.0, "h") == 0.0  # refilled (one second deep)
    assert LimitState(ServeLimits()).delay(b"a", 10**9, 0.0, "h") == 0.0  # no rate
