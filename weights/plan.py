"""``FetchPlan``: which chunk to ask of which peer, and whom to avoid (sans-IO; time is passed in).

* Every peer gets up to ``per_peer`` requests in flight, so several peers send at once
  and each keeps its pipe full (a chunk is small against a connection's bandwidth-delay
  product on a LAN, but not against a hashing or disk stall on the sender).
* A free slot takes a chunk of the *rarest* part the peer holds (fewest usable
  providers): if a provider leaves, the parts only it had are already done.
* A chunk whose bytes do not match the manifest's hash bans its sender for the rest of
  the fetch (an honest peer hashes what it serves, weights/local.py) and goes back to
  the queue; a failed request (timeout, connection lost, an error) backs the peer off
  exponentially (calls failing together count once) and puts the chunk back, to be tried
  first at other peers. ``BUSY`` is no failure: the peer's limit is reached, so fewer
  requests are kept in flight there (what it accepted), growing back by one per window
  of successes.
* Endgame (as BitTorrent): once nothing is left to hand out, a free slot asks for a chunk
  that is in flight at one other peer only; the first copy that verifies wins, and the
  caller cancels the other (``done`` returns the peers still fetching it). A slow peer
  then no longer holds up the end of a fetch.
"""

from __future__ import annotations

from collections import deque
from typing import Hashable, Iterable

__all__ = ["FetchPlan"]

Chunk = tuple[int, int]  # (part, index)


class FetchPlan:
    def __init__(self, chunks: Iterable[Chunk], *, per_peer: int = 4, backoff: float = 0.5, max_backoff: float = 15.0,
                 endgame: bool = True):
        self.per_peer = per_peer
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.endgame = endgame
        self._pending: dict[int, deque[int]] = {}
        for part, index in chunks:
            self._pending.setdefault(part, deque()).append(index)
        self.remaining = sum(len(q) for q in self._pending.values())
        self.providers: dict[Hashable, frozenset[int]] = {}
        self.in_flight: dict[Hashable, set[Chunk]] = {}
        self.banned: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._resting_until: dict[Hashable, float] = {}
        self._failed_at: dict[Chunk, set[Hashable]] = {}
        self._completed: set[Chunk] = set()
        self._limits: dict[Hashable, int] = {}  # lowered by BUSY, raised again by successes
        self._successes: dict[Hashable, int] = {}
        self.done_by: dict[Hashable, int] = {}
        self.duplicates = 0  # endgame requests made

    # ------------------------------------------------------------------ peers

    def set_providers(self, peer: Hashable, parts: Iterable[int]) -> None:
        if peer not in self.banned:
            self.providers[peer] = frozenset(parts)
            self.in_flight.setdefault(peer, set())

    def usable(self) -> list[Hashable]:
        return [p for p in self.providers if p not in self.banned]

    def _holders(self, part: int) -> int:
        return sum(1 for p, parts in self.providers.items() if part in parts and p not in self.banned)

    def _fetching(self, chunk: Chunk) -> list[Hashable]:
        """The peers a chunk is in flight at."""
        return [p for p, chunks in self.in_flight.items() if chunk in chunks]

    # ------------------------------------------------------------------ scheduling

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    def next_requests(self, now: float) -> list[tuple[Hashable, Chunk]]:
        """Fill every free slot of every usable peer that is not resting; the requests to make now."""
        out = []
        rarity = {part: self._holders(part) for part, q in self._pending.items() if q}
        peers = sorted((p for p in self.usable() if self._resting_until.get(p, 0.0) <= now),
                       key=lambda p: len(self.in_flight[p]))
        # round robin, one chunk per peer per round: a small fetch still spreads over every peer
        self._fill(peers, lambda peer: self._take(peer, rarity), out)
        if self.endgame and not any(self._pending.values()):
            before = len(out)
            self._fill(peers, self._duplicate, out)
            self.duplicates += len(out) - before
        return out

    def _fill(self, peers: list[Hashable], pick, out: list[tuple[Hashable, Chunk]]) -> None:
        open_peers = [p for p in peers if len(self.in_flight[p]) < self.limit(p)]
        while open_peers:
            still_open = []
            for peer in open_peers:
                chunk = pick(peer)
                if chunk is None:
                    continue
                self.in_flight[peer].add(chunk)
                out.append((peer, chunk))
                if len(self.in_flight[peer]) < self.limit(peer):
                    still_open.append(peer)
            open_peers = still_open

    def limit(self, peer: Hashable) -> int:
        """Requests to keep in flight at ``peer``: ``per_peer``, less after it answered ``BUSY``."""
        return self._limits.get(peer, self.per_peer)

    def _take(self, peer: Hashable, rarity: dict[int, int]) -> Chunk | None:
        parts = [part for part in self.providers[peer] if self._pending.get(part)]
        for part in sorted(parts, key=lambda part: rarity.get(part, 0)):
            queue = self._pending[part]
            # a chunk this peer already failed goes to others first; it may retry it once every
            # holder has failed it
            holders = {p for p in self.usable() if part in self.providers[p]}
            for _ in range(len(queue)):
                index = queue.popleft()
                failed = self._failed_at.get((part, index), set())
                if peer not in failed or holders <= failed:
                    return part, index
                queue.append(index)
        return None

    def _duplicate(self, peer: Hashable) -> Chunk | None:
        """An in-flight chunk this peer could also fetch: held by it, at one other peer only,
        not one it failed."""
        mine = self.in_flight[peer]
        for other, chunks in self.in_flight.items():
            if other == peer:
                continue
            for chunk in sorted(chunks):
                if (chunk[0] in self.providers[peer] and chunk not in mine
                        and peer not in self._failed_at.get(chunk, ()) and len(self._fetching(chunk)) == 1):
                    return chunk
        return None

    def next_wake(self, now: float) -> float | None:
        """When a resting peer may be asked again (None: nobody rests)."""
        times = [t for p, t in self._resting_until.items() if t > now and p not in self.banned]
        return min(times) if times else None

    def unavailable_parts(self) -> list[int]:
        """Parts with pending chunks that no usable peer holds."""
        return sorted(part for part, q in self._pending.items() if q and self._holders(part) == 0)

    # ------------------------------------------------------------------ outcomes

    def done(self, peer: Hashable, chunk: Chunk) -> list[Hashable]:
        """``peer`` delivered ``chunk`` and it verified. Returns the other peers still fetching it
        (endgame): the caller cancels those requests and reports them with ``cancelled``.
        Outcomes of a banned peer's requests are not reported: its chunks went back to the
        queue when it was banned."""
        if chunk not in self.in_flight.get(peer, ()):
            raise ValueError(f"{chunk} is not in flight at {peer!r}")
        if chunk in self._completed:
            raise ValueError(f"{chunk} was already delivered: cancel its other requests")
        self.in_flight[peer].discard(chunk)
        self._failures.pop(peer, None)
        self._failed_at.pop(chunk, None)
        self._completed.add(chunk)
        if peer in self._limits:  # additive increase: one more slot after a full window of successes
            self._successes[peer] = self._successes.get(peer, 0) + 1
            if self._successes[peer] >= self._limits[peer]:
                self._successes[peer] = 0
                self._limits[peer] += 1
                if self._limits[peer] >= self.per_peer:
                    del self._limits[peer]
        self.remaining -= 1
        self.done_by[peer] = self.done_by.get(peer, 0) + 1
        return self._fetching(chunk)

    def is_complete(self, chunk: Chunk) -> bool:
        return chunk in self._completed

    def cancelled(self, peer: Hashable, chunk: Chunk) -> None:
        """A request for a chunk another peer delivered first was cancelled: its slot is free."""
        self.in_flight.get(peer, set()).discard(chunk)

    def bad(self, peer: Hashable, chunk: Chunk) -> None:
        """``peer`` sent bytes that fail the hash: never ask it again; every chunk it had goes back
        (unless another peer is fetching it too)."""
        self.banned.add(peer)
        chunks = self.in_flight.pop(peer, set()) | {chunk}  # chunk is among them
        self.in_flight[peer] = set()
        for other in chunks:
            self._requeue(other)

    def busy(self, peer: Hashable, chunk: Chunk, now: float) -> None:
        """``peer`` refused for its limits (``BUSY``): no fault of the chunk or the peer. Keep no more
        in flight there than it has accepted (at least one), and put the chunk back."""
        if chunk in self.in_flight.get(peer, set()):
            self.in_flight[peer].discard(chunk)
            self._requeue(chunk)
        self._limits[peer] = max(1, min(self.limit(peer), len(self.in_flight.get(peer, ()))))
        self._successes[peer] = 0
        if not self.in_flight.get(peer):  # it is full with other fetchers: a short rest
            self._resting_until[peer] = max(self._resting_until.get(peer, 0.0), now + self.backoff)

    def failed(self, peer: Hashable, chunk: Chunk, now: float) -> None:
        """A request failed (timeout, refused, connection lost): rest the peer, requeue the chunk."""
        if chunk in self.in_flight.get(peer, set()):
            self.in_flight[peer].discard(chunk)
            self._failed_at.setdefault(chunk, set()).add(peer)
            self._requeue(chunk)
        if peer in self.banned or self._resting_until.get(peer, 0.0) > now:
            return  # calls that were in flight together fail together: one failure, not several
        failures = self._failures.get(peer, 0) + 1
        self._failures[peer] = failures
        self._resting_until[peer] = now + min(self.max_backoff, self.backoff * 2 ** (failures - 1))

    def _requeue(self, chunk: Chunk) -> None:
        if chunk in self._completed or self._fetching(chunk):
            return  # delivered already, or another peer still fetches it (endgame)
        part, index = chunk
        self._pending.setdefault(part, deque()).appendleft(index)
