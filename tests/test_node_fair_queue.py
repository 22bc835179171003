"""The node's fair compute queue (node/fair_queue.py): deficit round robin across peers, BUSY past a depth."""

from __future__ import annotations

import pytest

from biopetals.node.fair_queue import FairQueue


def test_one_peer_alone_is_fifo_and_work_conserving() -> None:
    q: FairQueue[str] = FairQueue()
    for k in range(5):
        assert q.push("a", f"a{k}", cost=2048)
    assert [q.pop() for _ in range(5)] == [f"a{k}" for k in range(5)]
    assert q.pop() is None and len(q) == 0


def test_big_jobs_of_one_peer_cannot_delay_another_peers_small_ones() -> None:
    """Six 2048-token Forwards queued first; an honest peer's one-token steps, one at a time, each run
    after at most one of them (the one running when it arrived is the executor's, not the queue's)."""
    q: FairQueue[str] = FairQueue(quantum=256)
    for k in range(6):
        q.push("insider", f"big{k}", cost=2048)
    order = []
    for step in range(20):
        q.push("honest", f"step{step}", cost=1)
        while True:
            job = q.pop()
            order.append(job)
            if job == f"step{step}":
                break
    waits = [sum(1 for j in order[: order.index(f"step{s}")] if j.startswith("big")) for s in range(20)]
    assert max(b - a for a, b in zip([0] + waits, waits)) <= 1  # at most one big job between two steps
    assert waits[-1] <= 2  # 20 one-token steps earned the insider ~20 tokens of credit, not 6 x 2048


def test_per_peer_depth_is_bounded() -> None:
    q: FairQueue[int] = FairQueue(max_per_peer=3)
    assert all(q.push("a", k) for k in range(3))
    assert not q.push("a", 3) and q.refused == 1
    assert q.push("b", 0) and q.waiting("a") == 3 and q.waiting("b") == 1
    assert q.pop() == 0  # a's oldest: a has 2 waiting, room for one more
    assert q.push("a", 4) and not q.push("a", 5)
    assert [q.pop() for _ in range(4)] == [0, 1, 2, 4]  # b's job, then a's (a alone now)
    with pytest.raises(ValueError):
        FairQueue(max_per_peer=0)
