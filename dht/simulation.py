"""An in-process swarm of DHT nodes on an in-memory network, for scale tests and benchmarks.

Every node is driven through the same sans-IO core as a real node: ``RoutingTable``,
``Storage``, ``RequestHandler`` and ``Lookup``, with every request and response
encoded and decoded by ``messages`` (spec/dht.md §7). The network is lock-step:
a *round* is one wave of requests sent by a lookup and their answers (a dead node's
request fails within the round, standing in for a REQUEST_TIMEOUT), so rounds
count network round trips. Nothing here uses asyncio, sockets or the clock.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from biopetals.protocol.identity import Identity

from . import params
from .handler import RequestHandler
from .ids import key_id, node_id
from .lookup import Lookup, LookupResult
from .messages import (
    Contact,
    FindNodeRequest,
    FindValueRequest,
    PingRequest,
    PingResponse,
    StoreRequest,
    StoreResponse,
    decode_response,
    encode,
)
from .records import Record, sign_record, to_ms
from .routing import RoutingTable
from .storage import Storage


def _sim_addr(i: int) -> str:
    """A distinct, well-formed (never dialled) address per simulated node."""
    return f"/ip4/10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/tcp/31337"


@dataclass
class SimNode:
    identity: Identity
    peer_id: bytes
    contact: Contact
    table: RoutingTable
    storage: Storage
    handler: RequestHandler
    alive: bool = True


@dataclass
class LookupRun:
    results: dict[bytes, LookupResult]
    rounds: int
    messages: int


@dataclass
class SimStats:
    rounds: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    successes: int = 0
    attempts: int = 0

    def add(self, run: LookupRun, ok: bool) -> None:
        self.rounds.append(run.rounds)
        self.messages.append(run.messages)
        self.attempts += 1
        self.successes += int(ok)

    def row(self) -> dict[str, float]:
        r, m = sorted(self.rounds), sorted(self.messages)
        return {
            "lookups": self.attempts,
            "success": self.successes / max(self.attempts, 1),
            "rounds_median": statistics.median(r) if r else 0,
            "rounds_p95": r[min(len(r) - 1, int(0.95 * len(r)))] if r else 0,
            "rounds_max": max(r, default=0),
            "messages_median": statistics.median(m) if m else 0,
            "messages_mean": statistics.fmean(m) if m else 0,
        }


class Swarm:
    """N simulated nodes; ``now`` is simulated unix time, advancing ``round_trip`` seconds per round."""

    def __init__(self, seed: int = 0, k: int = params.K, alpha: int = params.ALPHA, now: float = 1.7e9,
                 round_trip: float = 0.05) -> None:
        self.round_trip = round_trip
        self.rng = random.Random(seed)
        self.k, self.alpha = k, alpha
        self.now = now
        self.nodes: dict[bytes, SimNode] = {}
        self.messages = 0

    # ------------------------------------------------------------------ network

    def add_node(self) -> SimNode:
        identity = Identity.from_private_bytes(self.rng.randbytes(32))
        pid = identity.peer_id.multihash
        table = RoutingTable(pid, self.k)
        storage = Storage()
        node = SimNode(identity, pid, Contact(pid, (_sim_addr(len(self.nodes)),)), table, storage, RequestHandler(table, storage))
        self.nodes[pid] = node
        return node

    def _call(self, src: SimNode, dst: Contact, request: bytes) -> bytes | None:
        """Deliver request bytes; None if the destination is dead (a timeout)."""
        self.messages += 1
        node = self.nodes.get(dst.peer_id)
        if node is None or not node.alive:
            return None
        response, to_ping = node.handler.handle_bytes(src.peer_id, request, self.now)
        if to_ping is not None:
            self._ping_stale(node, to_ping)
        return response

    def _ping_stale(self, node: SimNode, stale: Contact) -> None:
        """What a real node does with ``add_or_update``'s answer (spec/dht.md §8.1)."""
        answer = self._call(node, stale, encode(PingRequest(node.contact.addrs)))
        if answer is not None and isinstance(decode_response(answer), PingResponse):
            node.table.add_or_update(stale, self.now)
        else:
            node.table.remove(stale.peer_id)

    def _heard_from(self, node: SimNode, contact: Contact) -> None:
        stale = node.table.add_or_update(contact, self.now)
        if stale is not None:
            self._ping_stale(node, stale)

    # ------------------------------------------------------------------ lookups

    def lookup(self, node: SimNode, targets: list[bytes], find_value: bool = False) -> LookupRun:
        seeds = {t: node.table.closest(t, self.k) for t in targets}
        lk = Lookup(targets, seeds, self.now, find_value=find_value, own_peer_id=node.peer_id, k=self.k, alpha=self.alpha)
        rounds = 0
        while not lk.done:
            queries = lk.next_requests(self.now)
            if not queries:
                break  # defensive: a consistent lookup always has work until done
            rounds += 1
            for q in queries:
                if q.find_value:
                    request = encode(FindValueRequest(q.targets, node.contact.addrs))
                else:
                    request = encode(FindNodeRequest(q.targets[0], node.contact.addrs))
                answer = self._call(node, q.contact, request)
                if answer is None:
                    lk.on_failure(q.query_id, self.now)
                    node.table.remove(q.contact.peer_id)
                    continue
                if lk.on_response(q.query_id, decode_response(answer), self.now):
                    self._heard_from(node, q.contact)
            self.now += self.round_trip
        for t in targets:
            node.table.touch_bucket(t, self.now)
        return LookupRun(lk.results(), rounds, lk.stats.queries)

    def join(self, node: SimNode, bootstrap: SimNode | None) -> LookupRun | None:
        """Bootstrap as spec/dht.md §8.4: learn one peer, then look up our own id."""
        if bootstrap is None:
            return None
        self._heard_from(node, bootstrap.contact)
        return self.lookup(node, [node_id(node.peer_id)])

    def build(self, n: int) -> None:
        """Add ``n`` nodes one by one, each joining through a random earlier node."""
        joined: list[SimNode] = []
        for _ in range(n):
            node = self.add_node()
            self.join(node, self.rng.choice(joined) if joined else None)
            joined.append(node)

    def store(self, node: SimNode, key: str, value: bytes, ttl: float = 3000.0) -> tuple[Record, int]:
        """Sign under subkey = our peer id and STORE at the k closest; returns (record, acks)."""
        record = sign_record(node.identity, key, node.peer_id, value, to_ms(self.now + ttl))
        run = self.lookup(node, [key_id(key)])
        acks = 0
        for contact in run.results[key_id(key)].contacts:
            answer = self._call(node, contact, encode(StoreRequest((record,), node.contact.addrs)))
            if answer is not None:
                resp = decode_response(answer)
                acks += int(isinstance(resp, StoreResponse) and resp.statuses == (0,))
        return record, acks

    def kill_fraction(self, fraction: float) -> None:
        for node in self.rng.sample(list(self.nodes.values()), int(fraction * len(self.nodes))):
            node.alive = False

    def alive_nodes(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.alive]

    def true_closest(self, target: bytes, count: int) -> list[bytes]:
        t = int.from_bytes(target, "big")
        ranked = sorted(self.alive_nodes(), key=lambda n: int.from_bytes(node_id(n.peer_id), "big") ^ t)
        return [n.peer_id for n in ranked[:count]]


# ---------------------------------------------------------------------- experiment


def run_experiment(n: int, dead_fractions: tuple[float, ...] = (0.0, 0.3), lookups: int = 200, seed: int = 0,
                   batch: int = 32) -> list[dict]:
    """Build a swarm of ``n``, store records, then measure lookups at each dead fraction.

    For each fraction: FIND_NODE lookups of random ids from random live nodes (success:
    the closest live node is among the results), value lookups of stored keys
    (success: the record is found), and one batched lookup of ``batch`` keys.
    """
    swarm = Swarm(seed)
    swarm.build(n)
    keys = [f"bench/model.{i}" for i in range(lookups)]
    stored: dict[str, Record] = {}
    for key in keys:
        record, _ = swarm.store(swarm.rng.choice(swarm.alive_nodes()), key, b"x" * 64)
        stored[key] = record
    rows = []
    for fraction in dead_fractions:
        if fraction:
            live_before = len(swarm.alive_nodes())
            target_dead = int(fraction * n) - (n - live_before)
            if target_dead > 0:
                for node in swarm.rng.sample(swarm.alive_nodes(), target_dead):
                    node.alive = False
        node_stats, value_stats = SimStats(), SimStats()
        for _ in range(lookups):
            origin = swarm.rng.choice(swarm.alive_nodes())
            target = swarm.rng.randbytes(32)
            run = swarm.lookup(origin, [target])
            found = [c.peer_id for c in run.results[target].contacts]
            expected = [p for p in swarm.true_closest(target, 2) if p != origin.peer_id][0]
            node_stats.add(run, expected in found)
        for key in keys:
            origin = swarm.rng.choice(swarm.alive_nodes())
            run = swarm.lookup(origin, [key_id(key)], find_value=True)
            got = run.results[key_id(key)].records.get(stored[key].subkey)
            value_stats.add(run, got == stored[key])
        origin = swarm.rng.choice(swarm.alive_nodes())
        batch_keys = keys[:batch]
        run = swarm.lookup(origin, [key_id(k) for k in batch_keys], find_value=True)
        batch_found = sum(run.results[key_id(k)].records.get(stored[k].subkey) == stored[k] for k in batch_keys)
        for kind, stats in (("find_node", node_stats), ("get", value_stats)):
            rows.append({"nodes": n, "dead": fraction, "kind": kind, **stats.row()})
        rows.append({"nodes": n, "dead": fraction, "kind": f"get_many({len(batch_keys)})", "lookups": 1,
                     "success": batch_found / len(batch_keys), "rounds_median": run.rounds, "rounds_p95": run.rounds,
                     "rounds_max": run.rounds, "messages_median": run.messages, "messages_mean": run.messages})
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| nodes | dead | lookup | lookups | success | rounds median | rounds p95 | rounds max | messages median | messages mean |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['nodes']} | {r['dead']:.0%} | {r['kind']} | {r['lookups']} | {r['success']:.1%} | "
            f"{r['rounds_median']:g} | {r['rounds_p95']:g} | {r['rounds_max']:g} | "
            f"{r['messages_median']:g} | {r['messages_mean']:.1f} |"
        )
    return "\n".join(lines)
