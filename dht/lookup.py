"""Iterative Kademlia lookup of one or many ids as a sans-IO state machine.

See spec/dht.md §8.2 (lookup) and §8.3 (batched value lookup). The caller drives it:

    lookup = Lookup(targets, table.closest(...), now, find_value=True)
    while not lookup.done:
        for query in lookup.next_requests(now):      # send these (FIND_NODE / FIND_VALUE)
            ...
        lookup.on_response(query_id, response, now)  # or lookup.on_failure(query_id, now)
        lookup.handle_timer(now)                     # at lookup.get_timer()
    lookup.results()

No I/O, no clock: every method takes ``now``. Records returned by peers are validated
(spec/dht.md §4) before they are kept; invalid ones are counted and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from biopetals.protocol.errors import RemoteProtocolError

from . import params
from .ids import key_id as hash_key
from .ids import node_id
from .messages import Contact, FindNodeResponse, FindValueResponse, Response
from .records import Record, validate

_NEW, _IN_FLIGHT, _DONE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Query:
    """One request the caller must send: FIND_VALUE (``find_value``) or FIND_NODE of ``targets``."""

    query_id: int
    contact: Contact
    targets: tuple[bytes, ...]
    find_value: bool


@dataclass
class LookupResult:
    target: bytes
    contacts: list[Contact]  # up to k closest that answered, closest first
    records: dict[bytes, Record]  # subkey -> record with the greatest expiration


@dataclass
class LookupStats:
    queries: int = 0
    responses: int = 0
    failures: int = 0
    invalid_records: int = 0


class _Target:
    __slots__ = ("target", "tint", "cands", "best", "widened", "records", "finished", "inflight")

    def __init__(self, target: bytes) -> None:
        self.target = target
        self.tint = int.from_bytes(target, "big")
        self.cands: dict[bytes, list] = {}  # peer id -> [distance, state, contact]
        self.best: int | None = None
        self.widened = False
        self.records: dict[bytes, Record] = {}
        self.finished = False
        self.inflight = 0


@dataclass
class _Pending:
    query: Query
    deadline: float

    @property
    def contact(self) -> Contact:
        return self.query.contact

    @property
    def targets(self) -> tuple[bytes, ...]:
        return self.query.targets


class Lookup:
    """Lookup of ``targets`` (32-byte ids), seeded with contacts from the local table.

    ``seeds`` is one list for every target, or a list per target.
    """

    def __init__(
        self,
        targets: list[bytes],
        seeds: list[Contact] | dict[bytes, list[Contact]],
        now: float,
        *,
        find_value: bool = False,
        own_peer_id: bytes | None = None,
        k: int = params.K,
        alpha: int = params.ALPHA,
        timeout: float = params.REQUEST_TIMEOUT,
        max_keys_per_query: int = params.MAX_KEYS_PER_FIND,
    ) -> None:
        self.find_value = find_value
        self.k, self.alpha, self.timeout = k, alpha, timeout
        self.max_keys = max_keys_per_query if find_value else 1
        self.own_peer_id = own_peer_id
        self._targets = {t: _Target(t) for t in dict.fromkeys(targets)}
        self._failed: set[bytes] = set()
        self._pending: dict[int, _Pending] = {}
        self._next_id = 0
        self.stats = LookupStats()
        for t in self._targets.values():
            self._merge(t, seeds.get(t.target, []) if isinstance(seeds, dict) else seeds)
            self._check_finished(t)

    # ------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        return all(t.finished for t in self._targets.values())

    def _merge(self, t: _Target, contacts: tuple[Contact, ...] | list[Contact]) -> bool:
        """Add contacts; True if one is closer than anything seen before."""
        improved = False
        for c in contacts:
            pid = c.peer_id
            if pid == self.own_peer_id or pid in self._failed or pid in t.cands:
                continue
            d = int.from_bytes(node_id(pid), "big") ^ t.tint
            t.cands[pid] = [d, _NEW, c]
            if t.best is None or d < t.best:
                t.best = d
                improved = True
        return improved

    def _window(self, t: _Target) -> list[list]:
        """The k closest candidates that have not failed."""
        live = [c for pid, c in t.cands.items() if pid not in self._failed]
        live.sort(key=lambda c: c[0])
        return live[: self.k]

    def _check_finished(self, t: _Target) -> None:
        if not t.finished and all(c[1] == _DONE for c in self._window(t)):
            t.finished = True

    # ------------------------------------------------------------------ driving

    def next_requests(self, now: float) -> list[Query]:
        """Requests to send now (each marks its candidates in flight)."""
        wanted: dict[bytes, tuple[Contact, list[bytes]]] = {}
        for t in self._targets.values():
            if t.finished:
                continue
            limit = self.k if t.widened else self.alpha
            room = limit - t.inflight
            if room <= 0:
                continue
            for cand in self._window(t):
                if room <= 0:
                    break
                if cand[1] == _NEW:
                    cand[1] = _IN_FLIGHT
                    t.inflight += 1
                    room -= 1
                    contact = cand[2]
                    wanted.setdefault(contact.peer_id, (contact, []))[1].append(t.target)
        queries = []
        for contact, targets in wanted.values():
            for i in range(0, len(targets), self.max_keys):
                chunk = tuple(targets[i : i + self.max_keys])
                qid = self._next_id
                self._next_id += 1
                query = Query(qid, contact, chunk, self.find_value)
                self._pending[qid] = _Pending(query, now + self.timeout)
                queries.append(query)
        self.stats.queries += len(queries)
        return queries

    def on_response(self, query_id: int, response: Response, now: float) -> bool:
        """Feed a response. Returns False (and counts a failure) if it does not fit the query."""
        pending = self._pending.pop(query_id, None)
        if pending is None:
            return False  # late answer to a query already timed out
        if self.find_value:
            ok = isinstance(response, FindValueResponse) and len(response.results) == len(pending.targets)
        else:
            ok = isinstance(response, FindNodeResponse)
        if not ok:
            self._pending[query_id] = pending
            self.on_failure(query_id, now)
            return False
        self.stats.responses += 1
        pid = pending.contact.peer_id
        for i, target in enumerate(pending.targets):
            t = self._targets[target]
            t.inflight -= 1
            t.cands[pid][1] = _DONE
            if self.find_value:
                result = response.results[i]  # type: ignore[union-attr]
                contacts = result.contacts
                self._take_records(t, result.records, now)
            else:
                contacts = response.contacts  # type: ignore[union-attr]
            if not self._merge(t, contacts):
                t.widened = True  # no progress: ask all k closest (spec/dht.md §8.2)
            self._check_finished(t)
        return True

    def _take_records(self, t: _Target, records: tuple[Record, ...], now: float) -> None:
        for r in records:
            held = t.records.get(r.subkey)
            if held is not None and r.expiration <= held.expiration:
                continue  # not newer than what we hold: dropped unverified (k replicas send the same record)
            try:
                if hash_key(r.key) != t.target:
                    raise RemoteProtocolError(0, "record under the wrong key")
                validate(r, now)
            except RemoteProtocolError:
                self.stats.invalid_records += 1
                continue
            t.records[r.subkey] = r

    def on_failure(self, query_id: int, now: float) -> Query | None:
        """The query failed (error, bad response, connection lost). Returns it (None if unknown)."""
        pending = self._pending.pop(query_id, None)
        if pending is None:
            return None
        self.stats.failures += 1
        self._failed.add(pending.contact.peer_id)
        for target in pending.targets:
            t = self._targets[target]
            t.inflight -= 1
        for t in self._targets.values():
            self._check_finished(t)
        return pending.query

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next be called (the earliest request deadline)."""
        return min((p.deadline for p in self._pending.values()), default=None)

    def handle_timer(self, now: float) -> list[Query]:
        """Fail every request past its deadline; returns those queries (the caller may cancel them)."""
        expired = [qid for qid, p in self._pending.items() if p.deadline <= now]
        return [q for qid in expired if (q := self.on_failure(qid, now)) is not None]

    # ------------------------------------------------------------------ results

    def results(self) -> dict[bytes, LookupResult]:
        out = {}
        for t in self._targets.values():
            answered = sorted((c for c in t.cands.values() if c[1] == _DONE), key=lambda c: c[0])
            out[t.target] = LookupResult(t.target, [c[2] for c in answered[: self.k]], dict(t.records))
        return out
