"""Fair share of a node's compute across peers: deficit round robin, and BUSY past a per-peer depth.

Issue 21 (item 6): with one FIFO queue, one insider's six maximum-size Forwards made an
honest generate 170x slower. ``FairQueue`` keeps one FIFO per peer and serves the peers
in turn, deficit-round-robin by cost (Shreedhar and Varghese, 1995): each turn a peer
with work gets ``quantum`` more credit and runs its oldest job once the credit covers
the job's cost (the tokens it computes). A peer asking for a 2048-token Forward thus
waits its turn behind others' one-token decode steps instead of in front of them, and
the queue stays work-conserving: when nobody else waits, the big job runs at once.
``push`` refuses (the caller answers ``BUSY``) a peer that already has
``max_per_peer`` jobs waiting.

Sans-IO and not thread-safe: the caller (node/backend.py) holds its lock around
``push`` and ``pop``. ``current_peer`` is the context variable the node's stream
handler sets, so the backend knows whose job it queues without changing every call.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from contextvars import ContextVar
from typing import Any, Final, Generic, Hashable, TypeVar

__all__ = ["FairQueue", "current_peer", "MAX_QUEUE_PER_PEER", "QUANTUM"]

T = TypeVar("T")

#: Default jobs one peer may have waiting for compute; more are answered BUSY. A client (or an API
#: server) runs one step at a time per session, so this is its concurrent sessions and requests.
MAX_QUEUE_PER_PEER: Final = 128
#: Default credit (tokens) a peer gets per round.
QUANTUM: Final = 256

#: The peer whose request the running task serves (set per stream by node/handler.py).
current_peer: ContextVar[Hashable | None] = ContextVar("biopetals_current_peer", default=None)


class FairQueue(Generic[T]):
    """Jobs by peer; ``pop`` returns the next job in deficit-round-robin order."""

    def __init__(self, *, max_per_peer: int = MAX_QUEUE_PER_PEER, quantum: int = QUANTUM) -> None:
        if max_per_peer < 1 or quantum < 1:
            raise ValueError("max_per_peer and quantum must be >= 1")
        self.max_per_peer = max_per_peer
        self.quantum = quantum
        # peer -> [deficit, deque of (cost, job)], in round-robin order (the next to serve first)
        self._peers: OrderedDict[Any, list[Any]] = OrderedDict()
        self._len = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._len

    def waiting(self, peer: Hashable | None) -> int:
        entry = self._peers.get(peer)
        return len(entry[1]) if entry is not None else 0

    def push(self, peer: Hashable | None, job: T, cost: int = 1) -> bool:
        """Queue ``job`` for ``peer``; False (nothing queued) if the peer already has ``max_per_peer`` waiting."""
        entry = self._peers.get(peer)
        if entry is None:
            entry = self._peers[peer] = [0, deque()]
        elif len(entry[1]) >= self.max_per_peer:
            self.refused += 1
            return False
        entry[1].append((max(1, cost), job))
        self._len += 1
        return True

    def pop(self) -> T | None:
        """The next job to run, or None if nothing waits."""
        if not self._len:
            return None
        peers = self._peers
        while True:
            peer, entry = next(iter(peers.items()))
            jobs: deque[tuple[int, T]] = entry[1]
            cost, job = jobs[0]
            if entry[0] >= cost:
                jobs.popleft()
                entry[0] -= cost
                self._len -= 1
                if jobs:
                    peers.move_to_end(peer)  # one job per turn; the credit left is kept for the next
                else:
                    del peers[peer]  # an idle peer keeps no credit (DRR)
                return job
            # Not enough credit: a quantum more, and the next peer's turn. A job costing c
            # runs after at most ceil(c / quantum) rounds.
            entry[0] += self.quantum
            if entry[0] < cost:
                peers.move_to_end(peer)
