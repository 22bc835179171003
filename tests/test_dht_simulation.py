"""A 200-node in-memory swarm driven through the real sans-IO core (dht/simulation.py)."""

from __future__ import annotations

import math

from biopetals.dht.ids import key_id
from biopetals.dht.simulation import Swarm, markdown_table, run_experiment


def test_200_nodes_all_lookups_succeed_within_log2_rounds() -> None:
    n = 200
    rows = run_experiment(n, lookups=40, seed=1, batch=32)
    print(markdown_table(rows))
    bound = math.ceil(math.log2(n))
    for row in rows:
        assert row["success"] == 1.0, row
        assert row["rounds_median"] <= bound, row
    by = {(r["dead"], r["kind"]): r for r in rows}
    # batching: one traversal for 32 keys costs far fewer requests than 32 lookups
    assert by[(0.0, "get_many(32)")]["messages_mean"] < 0.6 * 32 * by[(0.0, "get")]["messages_mean"]


def test_expired_records_disappear_and_dead_writer_is_not_found() -> None:
    swarm = Swarm(seed=3)
    swarm.build(60)
    writer = swarm.alive_nodes()[5]
    record, acks = swarm.store(writer, "m.0", b"hello", ttl=30)
    assert acks == 20  # stored at the k closest nodes
    reader = swarm.alive_nodes()[40]
    run = swarm.lookup(reader, [key_id("m.0")], find_value=True)
    assert run.results[key_id("m.0")].records == {writer.peer_id: record}
    writer.alive = False
    swarm.now += 31
    run = swarm.lookup(reader, [key_id("m.0")], find_value=True)
    assert run.results[key_id("m.0")].records == {}
    assert all(len(n.storage.expire(swarm.now)) <= 1 and len(n.storage) == 0 for n in swarm.alive_nodes())
