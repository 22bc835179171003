"""Route finding (client/routing.py): sans-IO unit tests, no sockets."""

from __future__ import annotations

import ast
import random
from collections import Counter
from pathlib import Path

import pytest

from biopetals.client.routing import (
    DeadlineParams,
    MissingBlocksError,
    PeerHealth,
    RoutingParams,
    ServerSpan,
    expected_step_time,
    find_route,
    missing_ranges,
    route_cost,
    step_deadline,
)


def S(peer: str, start: int, end: int, tps: float = 100.0, cache: int = 1 << 20, online: bool = True) -> ServerSpan:
    return ServerSpan(peer, start, end, (f"/ip4/127.0.0.1/tcp/1/p2p/{peer}",), tps, tps, cache, online)


def spans(route):
    return [(r.peer_id, r.start, r.end) for r in route]


def test_single_server_covers_everything():
    route = find_route([S("a", 0, 8)], 0, 8, now=0, rng=random.Random(0))
    assert spans(route) == [("a", 0, 8)]


def test_chain_of_two():
    route = find_route([S("b", 4, 8), S("a", 0, 4)], 0, 8, now=0, rng=random.Random(0))
    assert spans(route) == [("a", 0, 4), ("b", 4, 8)]


def test_prefers_fewer_hops_when_rtt_dominates():
    servers = [S("a", 0, 4), S("b", 4, 8), S("whole", 0, 8)]
    rtts = {"a": 0.05, "b": 0.05, "whole": 0.05}
    assert spans(find_route(servers, 0, 8, now=0, rng=random.Random(0), rtts=rtts)) == [("whole", 0, 8)]


def test_prefers_fast_servers_when_compute_dominates():
    servers = [S("fast1", 0, 4, tps=1000), S("fast2", 4, 8, tps=1000), S("slow", 0, 8, tps=1)]
    rtts = {"fast1": 0.001, "fast2": 0.001, "slow": 0.001}
    assert spans(find_route(servers, 0, 8, now=0, rng=random.Random(0), rtts=rtts)) == [("fast1", 0, 4), ("fast2", 4, 8)]


def test_overlapping_spans_are_cut_at_boundaries():
    # a serves 0:6 slowly on 4:6? no: a is slow overall, b fast on 3:8
    servers = [S("a", 0, 6, tps=10), S("b", 3, 8, tps=1000)]
    route = find_route(servers, 0, 8, now=0, rng=random.Random(0), rtts={"a": 0.001, "b": 0.001})
    assert spans(route) == [("a", 0, 3), ("b", 3, 8)]


def test_low_rtt_wins_between_equal_servers():
    servers = [S("near", 0, 8), S("far", 0, 8)]
    route = find_route(servers, 0, 8, now=0, rng=random.Random(0), rtts={"near": 0.001, "far": 0.2})
    assert spans(route) == [("near", 0, 8)]


def test_ties_spread_load():
    servers = [S(f"p{i}", 0, 8) for i in range(4)]
    rng = random.Random(1)
    picks = Counter(find_route(servers, 0, 8, now=0, rng=rng)[0].peer_id for _ in range(400))
    assert set(picks) == {"p0", "p1", "p2", "p3"}
    assert min(picks.values()) > 50


def test_clearly_better_server_is_not_jittered_away():
    servers = [S("good", 0, 8, tps=100), S("bad", 0, 8, tps=50)]
    rng = random.Random(2)
    picks = {find_route(servers, 0, 8, now=0, rng=rng, rtts={"good": 1e-4, "bad": 1e-4})[0].peer_id for _ in range(100)}
    assert picks == {"good"}


def test_concurrent_clients_spread_over_replicas_by_throughput_and_load():
    """Clients arriving one after another, each seeing the sessions already open (NodeInfo):
    replicas fill in proportion to their announced throughput, not all on the fastest."""
    from dataclasses import replace

    servers = [S("fast", 0, 8, tps=100), S("slow", 0, 8, tps=50), S("slower", 0, 8, tps=25)]
    open_sessions = Counter()
    rng = random.Random(3)
    for _ in range(70):
        loaded = [replace(s, sessions=open_sessions[s.peer_id]) for s in servers]
        open_sessions[find_route(loaded, 0, 8, now=0, rng=rng, rtts={s.peer_id: 1e-4 for s in servers})[0].peer_id] += 1
    assert 38 <= open_sessions["fast"] <= 42 and 18 <= open_sessions["slow"] <= 22 and 8 <= open_sessions["slower"] <= 12
    # without load feedback every client takes the fastest (the old behaviour)
    idle = {find_route(servers, 0, 8, now=0, rng=rng, rtts={s.peer_id: 1e-4 for s in servers})[0].peer_id
            for _ in range(50)}
    assert idle == {"fast"}


def test_load_moves_one_span_of_a_chain_only():
    from dataclasses import replace

    servers = [S("a", 0, 4), S("b", 4, 8), replace(S("b-busy", 4, 8), sessions=3)]
    for seed in range(10):
        route = find_route(servers, 0, 8, now=0, rng=random.Random(seed), rtts={"a": 1e-3, "b": 1e-3, "b-busy": 1e-3})
        assert spans(route) == [("a", 0, 4), ("b", 4, 8)]


def test_sub_range():
    route = find_route([S("a", 0, 4), S("b", 4, 8)], 2, 6, now=0, rng=random.Random(0))
    assert spans(route) == [("a", 2, 4), ("b", 4, 6)]


def test_missing_blocks_error_names_blocks_and_nodes():
    with pytest.raises(MissingBlocksError) as info:
        find_route([S("a", 0, 3), S("b", 5, 8)], 0, 8, now=0, rng=random.Random(0), model="m.1234")
    err = info.value
    assert err.missing == [(3, 5)]
    assert [s.peer_id for s in err.found] == ["a", "b"]
    text = str(err)
    assert "3:5" in text and "a serves 0:3" in text and "b serves 5:8" in text and "m.1234" in text


def test_nothing_found():
    with pytest.raises(MissingBlocksError, match="no nodes at all"):
        find_route([], 0, 4, now=0, rng=random.Random(0))


def test_banned_peer_is_avoided_then_forgiven():
    health = PeerHealth(base=2.0)
    servers = [S("a", 0, 8), S("b", 0, 8, tps=10)]
    rtts = {"a": 1e-4, "b": 1e-4}
    health.record_failure("a", now=100.0)
    assert spans(find_route(servers, 0, 8, now=101.0, rng=random.Random(0), rtts=rtts, health=health)) == [("b", 0, 8)]
    assert spans(find_route(servers, 0, 8, now=102.5, rng=random.Random(0), rtts=rtts, health=health)) == [("a", 0, 8)]


def test_backoff_doubles_and_success_resets():
    health = PeerHealth(base=1.0, cap=5.0)
    assert health.record_failure("x", 0.0) == 1.0
    assert health.record_failure("x", 0.0) == 2.0
    assert health.record_failure("x", 0.0) == 4.0
    assert health.record_failure("x", 0.0) == 5.0  # capped
    health.record_success("x")
    assert not health.is_banned("x", 0.0)
    assert health.record_failure("x", 0.0) == 1.0


def test_a_stall_is_banned_at_least_its_minimum_and_still_backs_off():
    health = PeerHealth(base=1.0, cap=300.0)
    assert health.record_failure("x", 10.0, at_least=30.0) == 40.0
    assert health.record_failure("x", 10.0, at_least=30.0) == 40.0  # 2 s of back-off < the 30 s minimum
    for _ in range(4):
        until = health.record_failure("x", 10.0, at_least=30.0)
    assert until == 10.0 + 32.0  # the back-off (1, 2, 4, ... 32 s) outgrows the minimum
    assert health.is_banned("x", 41.0) and not health.is_banned("x", 42.5)


def test_expected_step_time_follows_throughput_tokens_share_and_rtt():
    node = ServerSpan("a", 0, 8, (), inference_tps=10.0, forward_tps=100.0)
    one = expected_step_time(node, 0, 8, 1, 1, rtt=0.01)
    assert one == pytest.approx(0.1 + 0.02)  # one token at the decode rate + a round trip each way
    prefill = expected_step_time(node, 0, 8, 2, 51, rtt=0.01)
    assert prefill == pytest.approx(0.1 + 101 / 100.0 + 0.02)  # the rest at the batched rate
    assert expected_step_time(node, 0, 2, 1, 1, rtt=0.01) == pytest.approx(0.1 / 4 + 0.02)  # 2 of its 8 blocks
    unknown = ServerSpan("b", 0, 8)  # announces 0: the routing default rate; no RTT measured: the default
    params = RoutingParams(default_tps=5.0, default_rtt=0.05)
    assert expected_step_time(unknown, 0, 8, 1, 1, rtt=None, params=params) == pytest.approx(0.2 + 0.1)
    slow_forward = ServerSpan("c", 0, 8, (), inference_tps=10.0, forward_tps=1.0)  # never below decode speed
    assert expected_step_time(slow_forward, 0, 8, 1, 3, rtt=0.0) == pytest.approx(0.3 + 2 * 1e-4)


def test_step_deadline_is_clamped_between_floor_and_ceiling():
    params = DeadlineParams(floor=2.0, factor=8.0, ceiling=60.0)
    assert step_deadline(0.01, params) == 2.0  # a fast decode step: the floor
    assert step_deadline(1.0, params) == 8.0  # factor x expected
    assert step_deadline(100.0, params) == 60.0  # a decode step on a node announcing a crawl: the ceiling
    # The ceiling is per 512 tokens of work: a 4096-token prefill on slow nodes may take 8 ceilings
    # (issue 22: minutes on an 8B-shaped CPU span), never more.
    assert step_deadline(100.0, params, work=512) == 60.0
    assert step_deadline(100.0, params, work=513) == 120.0
    assert step_deadline(100.0, params, work=4096) == 480.0
    assert step_deadline(1000.0, params, work=4096) == 480.0
    assert step_deadline(0.01, params, work=4096) == 2.0  # the floor still holds for a fast node


def test_banned_peer_is_a_last_resort_only_for_blocks_nobody_else_serves():
    health = PeerHealth()
    health.record_failure("a", 0.0)
    assert spans(find_route([S("a", 0, 8)], 0, 8, now=0.5, rng=random.Random(0), health=health)) == [("a", 0, 8)]
    # "b" covers 4:8 healthily, so the banned "a" serves only 0:4 although it is faster.
    servers = [S("a", 0, 8, tps=1000), S("b", 4, 8, tps=10)]
    route = find_route(servers, 0, 8, now=0.5, rng=random.Random(0), health=health)
    assert spans(route) == [("a", 0, 4), ("b", 4, 8)]


def test_banned_peer_that_cannot_fill_the_gap_is_reported_with_its_reason():
    health = PeerHealth()
    health.record_failure("a", 0.0)
    with pytest.raises(MissingBlocksError, match="failed recently") as err:
        find_route([S("a", 0, 4)], 0, 8, now=0.5, rng=random.Random(0), health=health)
    assert err.value.missing == [(0, 8)]  # no usable peer serves any of them


def test_cache_room_and_offline_state_are_respected():
    servers = [S("full", 0, 8, cache=10), S("offline", 0, 8, online=False), S("ok", 0, 8, tps=1)]
    route = find_route(servers, 0, 8, now=0, rng=random.Random(0), needed_cache_tokens=100)
    assert spans(route) == [("ok", 0, 8)]
    with pytest.raises(MissingBlocksError, match="cache tokens left"):
        find_route(servers[:1], 0, 8, now=0, rng=random.Random(0), needed_cache_tokens=100)


def test_route_cost_model():
    servers = [S("a", 0, 4, tps=100)]
    route = find_route(servers, 0, 4, now=0, rng=random.Random(0), rtts={"a": 0.01})
    assert route_cost(route, {"a": 0.01}) == pytest.approx(0.01 + 4 * (1 / 400))


def test_unknown_throughput_uses_default():
    params = RoutingParams(default_tps=10.0)
    route = find_route([S("a", 0, 2, tps=0.0)], 0, 2, now=0, rng=random.Random(0), rtts={"a": 0.0}, params=params)
    assert route_cost(route, {"a": 0.0}, params) == pytest.approx(params.min_rtt + 2 / 20)


def test_missing_ranges():
    assert missing_ranges([S("a", 1, 3)], 0, 6) == [(0, 1), (3, 6)]
    assert missing_ranges([S("a", 0, 6)], 0, 6) == []


def test_routing_is_sans_io():
    tree = ast.parse((Path(__file__).resolve().parent.parent / "client" / "routing.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"asyncio", "socket", "time", "datetime", "selectors"}
