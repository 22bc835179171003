"""One peer's share of the node's KV cache (node/budget.py, ``--max-peer-cache-share``): sans-IO.

Issue 21 (item 6): one insider's sessions took the whole cache of every node and everyone
else got ``CACHE_BUDGET``. The rule: the sessions of one peer hold at most ``peer_share`` of
the total, so while it holds that much the rest stays for the others (spec/messages.md §5.1).
tests/test_node_bad_input.py shows the rule through a real node process.
"""

from __future__ import annotations

import pytest

from biopetals.node.budget import PEER_SHARE, CacheBudget
from biopetals.node.session_machine import Allocate, EndStream, NodeRules, Send, SessionMachine
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.messages import Error, OpenSession


def refused(budget: CacheBudget, owner: bytes, nbytes: int, peer) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        budget.reserve(owner, nbytes, peer)
    assert info.value.code == ErrorCode.CACHE_BUDGET
    return info.value.message


def test_a_peer_holds_at_most_its_share_and_the_rest_stays_for_others() -> None:
    budget = CacheBudget(bytes_per_token=10, total_tokens=100, session_tokens=30)
    assert budget.peer_share == PEER_SHARE == 0.5 and budget.peer_bytes == 500
    budget.reserve(b"i1", 300, "insider")
    assert "one peer may hold 500" in refused(budget, b"i2", 300, "insider")  # 600 > its share of 500
    budget.reserve(b"i2", 200, "insider")  # exactly its share
    assert "hold 500 already" in refused(budget, b"i3", 10, "insider")
    budget.reserve(b"h1", 300, "honest")
    budget.reserve(b"h2", 200, "honest")  # the other half was there for the other peer
    assert budget.tokens_left == 0 and budget.peer_reserved("insider") == budget.peer_reserved("honest") == 500
    assert "free" in refused(budget, b"x", 10, "third")  # the total, now
    budget.release(b"i1")
    budget.reserve(b"i1", 300, "insider")  # its share is free again
    assert budget.statistics().sessions == 4


def test_a_peer_may_always_hold_one_session_of_the_per_session_limit() -> None:
    # --max-session-tokens over half the cache: a lone client's long session must still open
    # (tests/test_client_long_context.py), and only one such session per peer
    budget = CacheBudget(bytes_per_token=10, total_tokens=100, session_tokens=80)
    assert budget.peer_bytes == 800
    budget.reserve(b"long", 800, "lab")
    assert "one peer may hold 800" in refused(budget, b"more", 10, "lab")
    assert "free" in refused(budget, b"other", 300, "other lab")  # the total still bounds everyone
    assert CacheBudget(bytes_per_token=10, total_tokens=100, session_tokens=300).peer_bytes == 1000  # never over the total


def test_a_share_of_one_is_the_total_only_and_bad_shares_are_refused() -> None:
    budget = CacheBudget(bytes_per_token=1, total_tokens=100, session_tokens=50, peer_share=1.0)
    budget.reserve(b"a", 50, "p")
    budget.reserve(b"b", 50, "p")
    assert "free" in refused(budget, b"c", 1, "p")
    for share in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            CacheBudget(1, 100, peer_share=share)


def test_the_session_machine_answers_cache_budget_past_a_peers_share() -> None:
    """Through ``SessionMachine.open``: the peer's third session is refused and its stream ended,
    another peer's opens (one byte per block and position, 4 blocks: 40 bytes a session)."""
    rules = NodeRules(model="m", start=0, end=4, hidden_size=8, max_positions=64, idle_timeout=10.0)
    m = SessionMachine(rules, CacheBudget(4, total_tokens=100, session_tokens=50),
                       lambda start, end, batch, length: (end - start) * batch * length)

    def open_(stream: str, peer: str, sid: bytes):
        return m.open(stream, peer, OpenSession(model="m", start=0, end=4, max_length=10, batch_size=1, codec="f32",
                                                session_id=sid), 0.0, b"fresh")

    for k in range(5):  # 5 x 40 bytes: the insider's share of 200 (of 400)
        assert [type(a) for a in open_(f"s{k}", "insider", bytes([k]))] == [Allocate]
    actions = open_("s5", "insider", b"5")
    assert [type(a) for a in actions] == [Send, EndStream] and isinstance(actions[0].message, Error)
    assert actions[0].message.code == ErrorCode.CACHE_BUDGET and "one peer may hold" in actions[0].message.message
    assert m.budget.peer_reserved("insider") == 200 and m.budget.tokens_left == 50
    for k in range(5):  # the other half is there for another peer
        assert [type(a) for a in open_(f"h{k}", "honest", b"h" + bytes([k]))] == [Allocate]
