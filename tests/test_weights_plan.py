"""FetchPlan, the fetcher's sans-IO scheduler (weights/plan.py)."""

from __future__ import annotations

from biopetals.weights.plan import FetchPlan


def _chunks(parts, per_part):
    return [(p, i) for p in parts for i in range(per_part)]


def test_every_provider_gets_work_and_each_chunk_goes_out_once():
    plan = FetchPlan(_chunks([0, 1, 2], 4), per_peer=2)
    for peer in "abc":
        plan.set_providers(peer, [0, 1, 2])
    requests = plan.next_requests(0.0)
    assert len(requests) == 6 and {peer for peer, _ in requests} == set("abc")
    assert len({chunk for _, chunk in requests}) == 6
    assert plan.next_requests(0.0) == []  # every slot taken
    for peer, chunk in requests:
        plan.done(peer, chunk)
    rest = plan.next_requests(0.0)
    assert len(rest) == 6 and not {c for _, c in rest} & {c for _, c in requests}
    for peer, chunk in rest:
        plan.done(peer, chunk)
    assert plan.finished and plan.remaining == 0


def test_rarest_part_first():
    plan = FetchPlan(_chunks([0, 1], 3), per_peer=1)
    plan.set_providers("a", [0, 1])
    plan.set_providers("b", [0])
    plan.set_providers("c", [0])
    # part 1 has one holder: "a" takes it first, though part 0 comes first in order
    assert dict(plan.next_requests(0.0))["a"][0] == 1


def test_bad_chunk_bans_the_sender():
    plan = FetchPlan(_chunks([0], 4), per_peer=2)
    plan.set_providers("liar", [0])
    plan.set_providers("honest", [0])
    requests = plan.next_requests(0.0)
    liar_chunks = [c for p, c in requests if p == "liar"]
    plan.bad("liar", liar_chunks[0])
    assert "liar" in plan.banned and plan.usable() == ["honest"]
    assert plan.remaining == 4
    for peer, chunk in requests:
        if peer == "honest":
            plan.done(peer, chunk)
    fetched = 2
    while not plan.finished:
        again = plan.next_requests(1.0)
        assert again and all(peer == "honest" for peer, _ in again)
        for peer, chunk in again:
            plan.done(peer, chunk)
            fetched += 1
    assert fetched == 4  # the liar's two chunks were fetched again, from the honest peer
    plan.set_providers("liar", [0])  # a later DHT read does not bring it back
    assert "liar" not in plan.providers or "liar" in plan.banned


def test_failure_rests_the_peer_and_others_retry_the_chunk():
    plan = FetchPlan(_chunks([0], 2), per_peer=1, backoff=1.0)
    plan.set_providers("a", [0])
    plan.set_providers("b", [0])
    first = dict(plan.next_requests(0.0))
    plan.failed("a", first["a"], now=0.0)
    assert plan.next_requests(0.5) == []  # a rests for 1 s, b is busy
    plan.done("b", first["b"])
    retry = plan.next_requests(0.5)
    assert retry == [("b", first["a"])]  # the failed chunk, at the other peer
    assert plan.next_wake(0.5) == 1.0
    plan.failed("b", first["a"], now=0.6)
    # both failed it: "a", rested, may retry it when nobody else can
    assert plan.next_requests(1.0) == [("a", first["a"])]


def test_unavailable_parts_are_reported():
    plan = FetchPlan(_chunks([0, 1], 1))
    plan.set_providers("a", [0])
    assert plan.unavailable_parts() == [1]


def test_endgame_asks_a_second_peer_for_the_last_chunks():
    plan = FetchPlan(_chunks([0], 3), per_peer=2)
    plan.set_providers("slow", [0])
    plan.set_providers("fast", [0])
    first = plan.next_requests(0.0)
    # 3 chunks over 4 slots: nothing is left to hand out, so the last free slot copies one in flight
    assert len(first) == 4 and len({c for _, c in first}) == 3 and plan.duplicates == 1
    copied = [c for c in {c for _, c in first} if sum(1 for _, x in first if x == c) == 2]
    assert len(copied) == 1
    assert plan.next_requests(0.1) == []  # every slot busy, and never a third copy
    slow_only = [c for p, c in first if p == "slow" and c not in copied]
    fast_own = [c for p, c in first if p == "fast" and c not in copied]
    for chunk in fast_own:
        assert plan.done("fast", chunk) == []
    # a slot of the fast peer is free again: it copies the slow peer's other chunk
    assert plan.next_requests(0.2) == [("fast", c) for c in slow_only]
    for chunk in copied + slow_only:
        holders = [p for p, c in first + [("fast", x) for x in slow_only] if c == chunk]
        winner = "fast"
        others = plan.done(winner, chunk)
        assert others == [p for p in dict.fromkeys(holders) if p != winner]
        for other in others:
            plan.cancelled(other, chunk)
    assert plan.finished and all(not chunks for chunks in plan.in_flight.values())


def test_a_failed_copy_in_endgame_does_not_requeue_what_another_peer_fetches():
    plan = FetchPlan(_chunks([0], 1), per_peer=1)
    plan.set_providers("a", [0])
    plan.set_providers("b", [0])
    first = plan.next_requests(0.0)
    assert sorted(p for p, _ in first) == ["a", "b"] and first[0][1] == first[1][1]  # one chunk, two copies
    chunk = first[0][1]
    plan.failed("a", chunk, now=0.0)
    assert plan.next_requests(5.0) == []  # still in flight at b: not handed out again, no third copy
    assert plan.done("b", chunk) == [] and plan.finished


def test_without_endgame_a_chunk_is_asked_once():
    plan = FetchPlan(_chunks([0], 1), per_peer=1, endgame=False)
    plan.set_providers("a", [0])
    plan.set_providers("b", [0])
    assert len(plan.next_requests(0.0)) == 1


def test_busy_lowers_the_peer_limit_without_resting_it_and_successes_raise_it_again():
    plan = FetchPlan(_chunks([0], 20), per_peer=4, backoff=1.0)
    plan.set_providers("a", [0])
    first = plan.next_requests(0.0)
    assert len(first) == 4
    plan.busy("a", first[2][1], now=0.0)
    plan.busy("a", first[3][1], now=0.0)
    assert plan.limit("a") == 2 and plan.next_requests(0.0) == []  # two still in flight: no more now
    plan.done("a", first[0][1])
    assert len(plan.next_requests(0.0)) == 1  # not resting: the freed slot is used at once
    plan.done("a", first[1][1])  # a window of 2 successes: one more slot
    assert plan.limit("a") == 3
    assert plan.remaining == 18


def test_busy_with_nothing_in_flight_rests_briefly_and_failures_together_count_once():
    plan = FetchPlan(_chunks([0], 3), per_peer=1, backoff=1.0)
    plan.set_providers("a", [0])
    ((_, chunk),) = plan.next_requests(0.0)
    plan.busy("a", chunk, now=0.0)
    assert plan.limit("a") == 1 and plan.next_requests(0.5) == [] and plan.next_wake(0.5) == 1.0
    plan = FetchPlan(_chunks([0], 4), per_peer=4, backoff=1.0)
    plan.set_providers("a", [0])
    for _, chunk in plan.next_requests(0.0):  # one lost connection fails all four calls
        plan.failed("a", chunk, now=0.0)
    assert plan.next_wake(0.0) == 1.0  # rests 1 s, not 8
