"""Routing table (spec/dht.md §1.4, §8.1), ids and the sans-IO lookup (§8.2, §8.3)."""

from __future__ import annotations

import ast
import hashlib
import random
from pathlib import Path


from biopetals.dht.ids import bucket_index, distance, key_id, node_id, random_id_in_bucket
from biopetals.dht.lookup import Lookup
from biopetals.dht.messages import Contact, FindNodeResponse, FindValueResponse, KeyResult, PingResponse
from biopetals.dht.records import sign_record, to_ms
from biopetals.dht.routing import RoutingTable
from biopetals.protocol.identity import Identity

RNG = random.Random(7)
NOW = 1_700_000_000.0


def peer() -> bytes:
    return Identity.from_private_bytes(RNG.randbytes(32)).peer_id.multihash


def contact(pid: bytes) -> Contact:
    return Contact(pid, ("/ip4/127.0.0.1/tcp/1",))


def test_sans_io_modules_import_no_io() -> None:
    """routing, lookup, storage, records, messages, handler never import asyncio/socket/time."""
    for name in ("ids", "routing", "lookup", "storage", "records", "messages", "handler", "simulation", "params"):
        tree = ast.parse((Path(__file__).parents[1] / "dht" / f"{name}.py").read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"asyncio", "socket", "time", "selectors"}, (name, imported)


def test_ids_and_distance() -> None:
    assert key_id("m.0") == hashlib.sha256(b"m.0").digest()
    a, b = node_id(peer()), node_id(peer())
    assert distance(a, a) == 0 and distance(a, b) == distance(b, a) > 0
    own = node_id(peer())
    for index in (0, 1, 17, 255):
        rid = random_id_in_bucket(own, index, RNG.randbytes(32))
        assert bucket_index(own, rid) == index


def test_bucket_fills_then_returns_least_recently_seen() -> None:
    own = peer()
    table = RoutingTable(own, k=4)
    own_id = node_id(own)
    # collect 6 peers that fall into bucket 0 (first bit differs)
    same = []
    while len(same) < 6:
        p = peer()
        if bucket_index(own_id, node_id(p)) == 0:
            same.append(p)
    for p in same[:4]:
        assert table.add_or_update(contact(p), NOW) is None
    assert table.add_or_update(contact(same[0]), NOW) is None  # seen again: moves to the tail
    stale = table.add_or_update(contact(same[4]), NOW)
    assert stale is not None and stale.peer_id == same[1]  # head = least recently seen
    assert same[4] not in table  # waits in the replacement cache
    # the stale node answered: it moves to the tail; next newcomer gets same[2] to ping
    assert table.add_or_update(stale, NOW) is None
    assert table.add_or_update(contact(same[5]), NOW).peer_id == same[2]
    # same[2] failed: the newest replacement (same[5]) takes its place
    assert table.remove(same[2]).peer_id == same[5]
    assert same[5] in table and same[2] not in table and len(table) == 4
    assert table.add_or_update(contact(own), NOW) is None and own not in table


def test_closest_is_sorted_by_xor_distance() -> None:
    table = RoutingTable(peer())
    peers = [peer() for _ in range(300)]
    for p in peers:
        table.add_or_update(contact(p), NOW)
    target = RNG.randbytes(32)
    got = [c.peer_id for c in table.closest(target, 10)]
    present = [p for p in peers if p in table]
    assert got == sorted(present, key=lambda p: distance(node_id(p), target))[:10]
    assert len(table) < 300  # far buckets filled up: k-bucket capacity is real


def test_refresh_lists_untouched_buckets() -> None:
    table = RoutingTable(peer())
    for _ in range(50):
        table.add_or_update(contact(peer()), NOW)
    touched = set(table.bucket_sizes())
    due_soon = table.buckets_to_refresh(NOW + 1, interval=600)
    assert not touched & set(due_soon)  # buckets that just heard from a node are fresh
    assert set(table.buckets_to_refresh(NOW + 600, interval=600)) >= touched
    assert max(table.buckets_to_refresh(NOW + 600, interval=600)) == max(touched) + 1
    target = random_id_in_bucket(table.own_id, 0, RNG.randbytes(32))
    table.touch_bucket(target, NOW + 600)
    assert 0 not in table.buckets_to_refresh(NOW + 600, interval=600)


# --------------------------------------------------------------------------- lookup


class World:
    """Static little network: each peer answers FIND_NODE from an ideal table."""

    def __init__(self, n: int) -> None:
        self.peers = [peer() for _ in range(n)]
        self.tables = {}
        for p in self.peers:
            t = RoutingTable(p, k=8)
            for q in self.peers:
                t.add_or_update(contact(q), NOW)
            self.tables[p] = t

    def answer(self, pid: bytes, target: bytes):
        return FindNodeResponse(tuple(self.tables[pid].closest(target, 8)))


def test_lookup_finds_true_closest_and_respects_alpha() -> None:
    world = World(120)
    origin, target = world.peers[0], RNG.randbytes(32)
    lk = Lookup([target], world.tables[origin].closest(target, 8)[-3:], NOW, own_peer_id=origin, k=8, alpha=3)
    rounds = 0
    while not lk.done:
        queries = lk.next_requests(NOW)
        assert queries
        assert all(len(q.targets) == 1 and not q.find_value for q in queries)
        rounds += 1
        for q in queries:
            lk.on_response(q.query_id, world.answer(q.contact.peer_id, target), NOW)
    assert rounds <= 7
    best = sorted((p for p in world.peers if p != origin), key=lambda p: distance(node_id(p), target))[:8]
    assert [c.peer_id for c in lk.results()[target].contacts] == best


def test_lookup_timeouts_by_now() -> None:
    world = World(40)
    target = RNG.randbytes(32)
    lk = Lookup([target], world.tables[world.peers[0]].closest(target, 8), NOW, own_peer_id=world.peers[0],
                k=8, alpha=3, timeout=5.0)
    first = lk.next_requests(NOW)
    assert len(first) == 3
    assert lk.get_timer() == NOW + 5.0
    assert lk.handle_timer(NOW + 4.9) == []
    failed = lk.handle_timer(NOW + 5.0)
    assert {q.contact.peer_id for q in failed} == {q.contact.peer_id for q in first}
    assert not lk.on_response(first[0].query_id, world.answer(first[0].contact.peer_id, target), NOW + 6)
    assert lk.stats.failures == 3
    again = lk.next_requests(NOW + 5)
    assert again and not {q.contact.peer_id for q in again} & {q.contact.peer_id for q in failed}


def test_lookup_rejects_wrong_response_type_and_all_failed_ends() -> None:
    pids = [peer() for _ in range(3)]
    target = RNG.randbytes(32)
    lk = Lookup([target], [contact(p) for p in pids], NOW, k=8, alpha=3)
    for q in lk.next_requests(NOW):
        assert lk.on_response(q.query_id, PingResponse(), NOW) is False
    assert lk.done and lk.results()[target].contacts == []


def test_batched_value_lookup_groups_keys_and_validates_records() -> None:
    a, b = Identity.from_private_bytes(bytes([1]) * 32), Identity.from_private_bytes(bytes([2]) * 32)
    keys = [f"m.{i}" for i in range(20)]
    holder = contact(peer())
    good = {k: sign_record(a, k, a.peer_id.multihash, b"v", to_ms(NOW + 60)) for k in keys}
    forged = sign_record(b, keys[0], a.peer_id.multihash, b"evil", to_ms(NOW + 90))
    lk = Lookup([key_id(k) for k in keys], [holder], NOW, find_value=True, k=8)
    queries = lk.next_requests(NOW)
    # one contact wanted by 20 keys: grouped into ceil(20 / MAX_KEYS_PER_FIND) requests
    assert [len(q.targets) for q in queries] == [16, 4]
    for q in queries:
        results = []
        for kid in q.targets:
            k = next(k for k in keys if key_id(k) == kid)
            recs = (good[k], forged) if k == keys[0] else (good[keys[1]], good[k])  # keys[1] under a wrong key
            results.append(KeyResult(recs, ()))
        assert lk.on_response(q.query_id, FindValueResponse(tuple(results)), NOW)
    assert lk.done
    res = lk.results()
    for k in keys:
        assert res[key_id(k)].records == {a.peer_id.multihash: good[k]}
    assert lk.stats.invalid_records == 1 + 18  # the forgery, and keys[1]'s record sent under 18 other keys


def test_mismatched_result_count_is_a_failure() -> None:
    lk = Lookup([RNG.randbytes(32), RNG.randbytes(32)], [contact(peer())], NOW, find_value=True)
    (q,) = lk.next_requests(NOW)
    assert lk.on_response(q.query_id, FindValueResponse((KeyResult((), ()),)), NOW) is False
    assert lk.stats.failures == 1 and lk.done
