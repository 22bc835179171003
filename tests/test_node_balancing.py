"""Block choice and rebalancing (node/balancing.py): sans-IO unit tests, no sockets."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest

from biopetals.node.balancing import (
    BalancingError,
    ServedSpan,
    block_throughputs,
    bottleneck,
    choose_best_span,
    resolve_join,
    should_move,
    spans_from_announcements,
)
from biopetals.protocol.announcement import Announcement, State


def S(peer: str, start: int, end: int, tps: float = 10.0, state: State = State.ONLINE) -> ServedSpan:
    return ServedSpan(peer, start, end, tps, state)


def A(start: int, end: int, tps: float, state: State = State.ONLINE) -> Announcement:
    return Announcement(state=state, start=start, end=end, inference_tps=tps, forward_tps=tps, cache_tokens_left=100,
                        dtype="float32", quant="none", version="biopetals/0.1.0")


def test_empty_swarm_takes_blocks_from_zero():
    for seed in range(20):
        assert choose_best_span([], 30, 8, 5.0, random.Random(seed)) == (0, 8)


def test_fills_the_gap():
    spans = [S("a", 0, 10), S("b", 20, 30)]
    assert choose_best_span(spans, 30, 10, 10.0, random.Random(0)) == (10, 20)


def test_fills_a_gap_from_its_side_and_covers_the_rest_with_least_overlap():
    spans = [S("a", 0, 8), S("b", 8, 16), S("c", 16, 24)]
    # 6 blocks unserved, 8 to place: the only window covering the whole gap
    assert choose_best_span(spans, 30, 8, 10.0, random.Random(0)) == (22, 30)
    # a smaller node starts at the gap's left edge, not in its middle
    for seed in range(10):
        assert choose_best_span(spans, 30, 3, 10.0, random.Random(seed)) == (24, 27)


def test_random_tie_break_among_equal_spans():
    # two equal gaps, 4:8 and 20:24: both are chosen, each often
    spans = [S("a", 0, 4), S("b", 8, 20), S("c", 24, 30)]
    picks = Counter(choose_best_span(spans, 30, 4, 10.0, random.Random(seed)) for seed in range(200))
    assert set(picks) == {(4, 8), (20, 24)}
    assert min(picks.values()) > 60


def test_the_least_served_blocks_win_and_own_throughput_counts():
    # every block served; blocks 10:15 by a slow node only
    spans = [S("a", 0, 10, 10.0), S("slow", 10, 15, 1.0), S("b", 15, 30, 10.0)]
    start, end = choose_best_span(spans, 30, 5, 4.0, random.Random(0))
    assert (start, end) == (10, 15)
    # a window must cover the whole valley to raise the bottleneck: 10 blocks, valley 10:15
    for seed in range(10):
        start, end = choose_best_span(spans, 30, 10, 4.0, random.Random(seed))
        assert start <= 10 and end >= 15
        assert start in (5, 10)  # aligned with one edge of the valley


def test_joining_nodes_count_so_that_concurrent_joiners_spread():
    spans = [S("a", 0, 8, state=State.JOINING)]
    assert choose_best_span(spans, 30, 8, 10.0, random.Random(0)) == (8, 16)


def test_offline_nodes_do_not_count_and_unknown_throughput_is_the_mean():
    anns = {"a": A(0, 10, 0.0), "b": A(10, 20, 30.0), "c": A(20, 30, 10.0), "d": A(0, 30, 99.0, State.OFFLINE),
            "e": A(5, 40, 10.0)}
    spans = {s.peer_id: s for s in spans_from_announcements(anns, 30)}
    assert set(spans) == {"a", "b", "c", "e"}
    assert spans["a"].throughput == pytest.approx(50.0 / 3)
    assert spans["e"].end == 30  # clipped to the model
    assert [s.throughput for s in spans_from_announcements({"x": A(0, 2, 0.0)}, 30)] == [1.0]


def test_block_throughputs_and_bottleneck():
    spans = [S("a", 0, 3, 2.0), S("b", 2, 4, 5.0)]
    assert block_throughputs(spans, 5) == [2.0, 2.0, 7.0, 5.0, 0.0]
    assert block_throughputs(spans, 5, exclude="b") == [2.0, 2.0, 2.0, 0.0, 0.0]
    assert bottleneck(block_throughputs(spans, 4)) == 2.0
    assert bottleneck([]) == 0.0


def test_concurrent_joiners_resolve_by_peer_id_order():
    # four joiners read the same empty swarm: all chose 0:8
    joiners = {p: S(p, 0, 8, state=State.JOINING) for p in "abcd"}
    rng = random.Random(0)
    for _ in range(4):  # rounds of "re-read, resolve"
        for peer in sorted(joiners):
            span = joiners[peer]
            better = resolve_join(joiners.values(), peer, (span.start, span.end), 30, 10.0, rng)
            if better is not None:
                joiners[peer] = S(peer, *better, state=State.JOINING)
    assert joiners["a"].start == 0  # the first in peer-id order never moves
    throughputs = block_throughputs(joiners.values(), 30)
    assert min(throughputs) > 0  # every block served
    assert sum(s.length for s in joiners.values()) - 30 == sum(t / 10.0 - 1 for t in throughputs)  # overlap = 2
    assert sum(1 for t in throughputs if t > 10.0) == 2


def test_resolve_join_keeps_a_span_that_is_among_the_best():
    spans = [S("a", 0, 10), S("b", 20, 30, state=State.JOINING), S("me", 10, 20, state=State.JOINING)]
    assert resolve_join(spans, "me", (10, 20), 30, 10.0, random.Random(0)) is None
    # a joiner sorted after "me" does not push it away, an earlier one does
    assert resolve_join([S("z", 0, 10, state=State.JOINING)], "me", (0, 10), 30, 10.0, random.Random(0)) is None
    assert resolve_join([S("a", 0, 10, state=State.JOINING)], "me", (0, 10), 30, 10.0, random.Random(0)) == (10, 20)


def test_should_move_fills_a_hole_left_by_a_dead_node():
    # c (20:30) died; a and b overlap on 0:20 twice over
    spans = [S("a", 0, 10), S("a2", 0, 10), S("b", 10, 20), S("b2", 10, 20)]
    moves = {p: should_move(spans, p, 30, random.Random(0)) for p in ("a", "a2", "b", "b2")}
    assert all(m == (20, 30) for m in moves.values())


def test_should_move_stays_when_balanced_or_the_gain_is_small():
    spans = [S("a", 0, 10), S("b", 10, 20), S("c", 20, 30)]
    assert all(should_move(spans, p, 30, random.Random(0)) is None for p in "abc")
    # 0:10 has 10 + 9 tokens/s, 10:20 only 10, 20:30 has 12: moving "a2" (9) to 10:20 would
    # leave 0:10 with 10, the same bottleneck as today's: nobody moves
    spans = [S("a", 0, 10), S("a2", 0, 10, 9.0), S("b", 10, 20), S("c", 20, 30, 12.0)]
    assert all(should_move(spans, p, 30, random.Random(0)) is None for p in ("a", "a2", "b", "c"))
    # 0:10 has 18, 10:20 has 10, 20:30 has 14: one 4-tokens/s node moving to 10:20 makes it
    # 14 everywhere; 10 / 14 = 0.71 < 0.75: move, but not with a quality of 0.7
    spans = [S("a", 0, 10, 10.0), S("x", 0, 10, 4.0), S("y", 0, 10, 4.0), S("b", 10, 20, 10.0), S("c", 20, 30, 14.0)]
    assert should_move(spans, "x", 30, random.Random(0), balance_quality=0.75) == (10, 20)
    assert should_move(spans, "x", 30, random.Random(0), balance_quality=0.7) is None


def test_small_gains_move_only_with_a_higher_quality():
    # 9.5 tokens/s on 10:20 is the bottleneck; "d" moving there reaches 10: 9.5 / 10 = 0.95
    spans = [S("a", 0, 10), S("d", 0, 10, 1.0), S("b", 10, 20, 9.5), S("c", 20, 30)]
    assert should_move(spans, "d", 30, random.Random(0)) is None
    assert should_move(spans, "d", 30, random.Random(0), balance_quality=0.96) == (10, 20)
    assert should_move(spans, "d", 30, random.Random(0), balance_quality=1.5) == (10, 20)


def test_bad_input_raises_typed_errors():
    with pytest.raises(BalancingError, match="cannot serve 31 blocks"):
        choose_best_span([], 30, 31, 1.0, random.Random(0))
    with pytest.raises(BalancingError, match="cannot serve 0 blocks"):
        choose_best_span([], 30, 0, 1.0, random.Random(0))
    with pytest.raises(BalancingError, match="throughput"):
        choose_best_span([], 30, 4, 0.0, random.Random(0))
    with pytest.raises(BalancingError, match="throughput"):
        choose_best_span([], 30, 4, float("nan"), random.Random(0))
    with pytest.raises(BalancingError, match="not among the spans"):
        should_move([S("a", 0, 30)], "me", 30, random.Random(0))
    with pytest.raises(BalancingError, match="balance_quality"):
        should_move([S("a", 0, 30)], "a", 30, random.Random(0), balance_quality=0.0)
    with pytest.raises(BalancingError, match="not inside"):
        resolve_join([], "me", (25, 35), 30, 1.0, random.Random(0))
    assert issubclass(BalancingError, ValueError)


@pytest.mark.parametrize("module", ["balancing.py", "balancing_sim.py"])
def test_balancing_is_sans_io(module):
    tree = ast.parse((Path(__file__).resolve().parent.parent / "node" / module).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"asyncio", "socket", "time", "datetime", "selectors", "torch"}


def test_relocating_announcements_read_back_over_a_real_dht():
    """Announcer.relocate over a real in-process DHT (loopback): the left blocks say offline with the
    old span, the new ones the new span; readers take the newest to balance and the newest online
    one to route (spec/announcement.md §2.3)."""
    import asyncio
    from contextlib import AsyncExitStack

    from biopetals.dht.announcements import newest, read_node_records, serving
    from biopetals.dht.ids import block_key
    from biopetals.protocol.announcement import decode_announcement
    from biopetals.dht.node import DHT, DHTConfig
    from biopetals.node.announcer import AnnouncementInfo, Announcer
    from biopetals.protocol.identity import Identity
    from biopetals.protocol.swarm_key import SwarmKey
    from biopetals.transport.host import Host

    key = SwarmKey.generate()

    async def main():
        async with AsyncExitStack() as stack:
            host = await stack.enter_async_context(Host(Identity.generate(), swarm_key=key))
            await host.listen("127.0.0.1", 0)
            dht = await stack.enter_async_context(DHT(host, initial_peers=[], config=DHTConfig(request_timeout=2.0)))
            reader_host = await stack.enter_async_context(Host(Identity.generate(), swarm_key=key))
            reader = await stack.enter_async_context(
                DHT(reader_host, initial_peers=[str(host.addrs[0])], config=DHTConfig(request_timeout=2.0),
                    client_mode=True))
            info = AnnouncementInfo("m", 0, 6, "float32", "none", "v", ())
            announcer = Announcer(dht, info)
            await announcer.relocate(2, 6, State.JOINING, (1.0, 1.0), 0)  # before any store: nothing to leave
            assert (await read_node_records(reader, "m", 10))[str(host.peer_id)][0].announcement.start == 2
            await announcer.announce(State.ONLINE, (5.0, 5.0), 10)
            # moving while serving: the new span joining under its blocks, then serving it
            await announcer.announce(State.JOINING, (5.0, 5.0), 0, info=AnnouncementInfo("m", 4, 8, "float32", "none",
                                                                                          "v", ()), blocks=range(4, 8))
            records = (await read_node_records(reader, "m", 10))[str(host.peer_id)]
            assert (newest(records).state, newest(records).start) == (State.JOINING, 4)
            assert (serving(records).state, serving(records).start) == (State.ONLINE, 2)
            # refreshes during the move keep both: the old-only blocks online, then the new span joining
            announcer.moving = (AnnouncementInfo("m", 4, 8, "float32", "none", "v", ()), (5.0, 5.0))
            for _ in range(3):  # whole refreshes (cancelling run() between its two stores would be a race)
                await announcer.refresh((5.0, 5.0), 10)
            announcer.moving = None
            records = (await read_node_records(reader, "m", 10))[str(host.peer_id)]
            assert (newest(records).state, newest(records).start) == (State.JOINING, 4)
            assert (serving(records).state, serving(records).start) == (State.ONLINE, 2)
            await announcer.relocate(4, 8, State.ONLINE, (5.0, 5.0), 10)
            found = await reader.get_many([block_key("m", b) for b in range(10)])
            by_block = {b: decode_announcement(next(iter(found[block_key("m", b)].values()))[0])
                        for b in range(10) if found.get(block_key("m", b))}
            assert {b: (a.state, a.start) for b, a in by_block.items()} == {
                2: (State.OFFLINE, 2), 3: (State.OFFLINE, 2), 4: (State.ONLINE, 4), 5: (State.ONLINE, 4),
                6: (State.ONLINE, 4), 7: (State.ONLINE, 4)}
            records = (await read_node_records(reader, "m", 10))[str(host.peer_id)]
            assert (newest(records).state, newest(records).start) == (State.ONLINE, 4)
            assert serving(records) == newest(records)

    asyncio.run(main())
