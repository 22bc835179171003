"""The asyncio DHT node: the sans-IO core (routing, lookup, storage) run over a transport ``Host``.

See spec/dht.md §7 (RPCs) and §8 (behaviour). This module only moves bytes and
keeps time: every decision comes from ``RoutingTable``, ``Lookup``, ``Storage``
and ``RequestHandler``. Usage::

    async with Host(identity, swarm_key=key) as host:
        await host.listen("0.0.0.0", 31337)
        async with DHT(host, initial_peers=["/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."]) as dht:
            await dht.store(block_key("my/model", 0), host.peer_id.multihash, b"...", time.time() + 60)
            await dht.get(block_key("my/model", 0))        # {subkey: (value, expiration)}
            await dht.get_many([...])                      # {key: {subkey: (value, expiration)}}

A DHT whose host does not listen (or ``client_mode=True``) asks but is never asked:
it sends no addresses, so no one adds it to a routing table (spec/dht.md §7).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.transport.host import Host

from . import params
from .handler import RequestHandler
from .ratelimit import PeerRateLimiter
from .ids import key_id, node_id, random_id_in_bucket
from .lookup import Lookup, LookupResult, Query
from .messages import (
    STATUS_OK,
    Contact,
    ErrorResponse,
    FindNodeRequest,
    FindValueRequest,
    PingRequest,
    PingResponse,
    Response,
    StoreRequest,
    StoreResponse,
    decode_response,
    encode,
)
from .records import Record, sign_record, to_ms
from .routing import RoutingTable
from .storage import Storage

__all__ = ["DHT", "DHTConfig", "StoreResult"]

log = logging.getLogger("biopetals.dht")


@dataclass(frozen=True)
class DHTConfig:
    """Tunables; defaults are the spec's parameters (spec/dht.md §2)."""

    k: int = params.K
    alpha: int = params.ALPHA
    request_timeout: float = params.REQUEST_TIMEOUT
    refresh_interval: float = params.REFRESH_INTERVAL
    republish_interval: float = params.REPUBLISH_INTERVAL
    #: How often the maintenance loop wakes (expiry, republish, refresh, bootstrap retry).
    tick: float = 1.0
    #: Seconds between bootstrap attempts while the routing table is empty.
    bootstrap_retry: float = 5.0
    #: Requests per second each peer may make of us (sustained, and in a burst); more are
    #: answered BUSY (dht/ratelimit.py). A lookup sends only a few requests to each peer.
    request_rate: float = 100.0
    request_burst: float = 200.0
    #: Storage quotas and per-address limits (spec/dht.md §5.4, §8.1).
    max_records_per_writer: int = params.MAX_RECORDS_PER_WRITER
    max_records_per_sender: int = params.MAX_RECORDS_PER_SENDER
    max_writers_per_address: int = params.MAX_WRITERS_PER_ADDRESS
    max_contacts_per_address: int = params.MAX_CONTACTS_PER_ADDRESS


@dataclass(frozen=True)
class StoreResult:
    record: Record
    accepted: int  # nodes that answered OK (ourselves included when we are among the k closest)
    rejected: dict[str, int]  # peer id -> error code, for nodes that refused the record


class DHT:
    """One DHT node (or client) on ``host``. Use ``async with DHT(host, ...) as dht``."""

    def __init__(
        self,
        host: Host,
        *,
        initial_peers: Iterable[str] = (),
        config: DHTConfig | None = None,
        client_mode: bool = False,
        announce_addrs: Iterable[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.config = config or DHTConfig()
        self.peer_id: bytes = host.peer_id.multihash
        cfg = self.config
        self.table = RoutingTable(self.peer_id, cfg.k, max_per_address=cfg.max_contacts_per_address)
        self.storage = Storage(
            max_records_per_writer=cfg.max_records_per_writer,
            max_records_per_sender=cfg.max_records_per_sender,
            max_writers_per_address=cfg.max_writers_per_address,
        )
        self.handler = RequestHandler(
            self.table, self.storage, limiter=PeerRateLimiter(self.config.request_rate, self.config.request_burst)
        )
        self.initial_peers = [str(a) for a in initial_peers]
        self.client_mode = client_mode
        self._announce = None if announce_addrs is None else tuple(str(a) for a in announce_addrs)
        self.clock = clock
        self._own: dict[tuple[str, bytes], tuple[Record, float]] = {}  # our records, last published
        self._pinging: set[bytes] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_bootstrap = -1e18

    # ------------------------------------------------------------------ lifecycle

    @property
    def sender_addrs(self) -> tuple[str, ...]:
        """Where others dial us, without /p2p/ (spec/dht.md §7); empty in client mode."""
        if self.client_mode:
            return ()
        if self._announce is not None:
            return self._announce
        return tuple(str(a.without_peer_id()) for a in self.host.addrs if a.host not in ("0.0.0.0", "::"))

    @property
    def contact(self) -> Contact:
        return Contact(self.peer_id, self.sender_addrs)

    async def __aenter__(self) -> DHT:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        if not self.client_mode:
            # Inline (no task per request): answering is sans-IO and in-memory (dht/handler.py).
            self.host.set_inline_handler(params.PROTOCOL, self._serve)
        try:
            await self.bootstrap()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._spawn(self._maintain())
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        assert self._tg is not None
        if not self.client_mode:
            self.host.remove_handler(params.PROTOCOL)
        for task in list(self._tasks):
            task.cancel()
        tg, self._tg = self._tg, None
        return await tg.__aexit__(exc_type, exc, tb)

    def _spawn(self, coro: Any) -> asyncio.Task:
        if self._tg is None:
            coro.close()
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "DHT is not running: use `async with DHT(...)`")
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ server side

    def _serve(self, peer: PeerId, request: bytes) -> bytes:
        """Inline handler (``Host.set_inline_handler``): must not wait; a stale contact's ping is its own task."""
        conn = self.host.connection(peer)
        address = conn.remote_address[0] if conn is not None and conn.remote_address else None
        response, to_ping = self.handler.handle_bytes(peer.multihash, request, self.clock(), address)
        if to_ping is not None:
            self._ping_stale(to_ping)
        return response

    def _heard_from(self, contact: Contact) -> None:
        """``contact`` answered us over an authenticated connection: into the table (spec/dht.md §8.1)."""
        conn = self.host.connection(PeerId(contact.peer_id))
        address = conn.remote_address[0] if conn is not None and conn.remote_address else None
        stale = self.table.add_or_update(contact, self.clock(), address)
        if stale is not None:
            self._ping_stale(stale)

    def _ping_stale(self, stale: Contact) -> None:
        """spec/dht.md §8.1: ping the least-recently-seen contact of a full bucket."""
        if stale.peer_id in self._pinging or self._tg is None:
            return
        self._pinging.add(stale.peer_id)

        async def ping() -> None:
            try:
                if await self.ping(stale):
                    self.table.add_or_update(stale, self.clock())
                else:
                    self.table.remove(stale.peer_id)
            finally:
                self._pinging.discard(stale.peer_id)

        self._spawn(ping())

    # ------------------------------------------------------------------ client side

    def _dial_target(self, contact: Contact) -> PeerId | str:
        pid = PeerId(contact.peer_id)
        if self.host.connection(pid) is not None or not contact.addrs:
            return pid
        addr = Multiaddr.parse(contact.addrs[0])
        return str(addr.with_peer_id(pid))

    async def _request(self, contact: Contact, request: Any) -> Response | None:
        """One RPC; None on any failure (timeout, refused, error response, bad bytes) except
        BUSY, which comes back as its ErrorResponse: the peer is alive, only overloaded."""
        try:
            data = await self.host.call(
                self._dial_target(contact), params.PROTOCOL, encode(request), timeout=self.config.request_timeout
            )
            response = decode_response(data)
        except (ProtocolError, OSError) as e:
            log.debug("DHT request to %s failed: %s", PeerId(contact.peer_id), e)
            return None
        if isinstance(response, ErrorResponse):
            log.debug("DHT request to %s answered with error %s: %s", PeerId(contact.peer_id), response.code, response.message)
            return response if response.code == ErrorCode.BUSY else None
        return response

    async def ping(self, contact: Contact) -> bool:
        """True if ``contact`` answered (a BUSY answer counts: it is alive)."""
        return isinstance(await self._request(contact, PingRequest(self.sender_addrs)), (PingResponse, ErrorResponse))

    async def _lookup(self, targets: list[bytes], find_value: bool) -> dict[bytes, LookupResult]:
        """Drive a ``Lookup`` (spec/dht.md §8.2-8.3) with real requests and the wall clock."""
        cfg = self.config
        seeds = {t: self.table.closest(t, cfg.k) for t in targets}
        lookup = Lookup(targets, seeds, self.clock(), find_value=find_value, own_peer_id=self.peer_id,
                        k=cfg.k, alpha=cfg.alpha, timeout=cfg.request_timeout)
        running: dict[asyncio.Task, Query] = {}
        try:
            while not lookup.done:
                for q in lookup.next_requests(self.clock()):
                    if q.find_value:
                        request: Any = FindValueRequest(q.targets, self.sender_addrs)
                    else:
                        request = FindNodeRequest(q.targets[0], self.sender_addrs)
                    running[self._spawn(self._request(q.contact, request))] = q
                if not running:
                    break
                timer = lookup.get_timer()
                wait = None if timer is None else max(0.0, timer - self.clock())
                done, _ = await asyncio.wait(running, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                now = self.clock()
                for task in done:
                    q = running.pop(task)
                    response = task.result()
                    if isinstance(response, ErrorResponse):  # BUSY: ask others, keep the contact
                        lookup.on_failure(q.query_id, now)
                    elif response is not None and lookup.on_response(q.query_id, response, now):
                        self._heard_from(q.contact)
                    else:
                        lookup.on_failure(q.query_id, now)  # no-op if on_response already failed it
                        self.table.remove(q.contact.peer_id)
                for q in lookup.handle_timer(now):
                    self.table.remove(q.contact.peer_id)
                    for task, tq in list(running.items()):
                        if tq.query_id == q.query_id:
                            task.cancel()
                            del running[task]
        finally:
            for task in running:
                task.cancel()
        now = self.clock()
        for t in targets:
            self.table.touch_bucket(t, now)
        return lookup.results()

    async def find_node(self, target: bytes) -> list[Contact]:
        """The k closest live contacts to a 32-byte id."""
        return (await self._lookup([target], find_value=False))[target].contacts

    # ------------------------------------------------------------------ bootstrap and maintenance

    async def bootstrap(self) -> int:
        """PING every initial peer, then look up our own id (spec/dht.md §8.4). Returns peers reached."""
        self._last_bootstrap = self.clock()
        reached = 0
        for addr in self.initial_peers:
            try:
                conn = await self.host.connect(addr, timeout=self.config.request_timeout)
            except (ProtocolError, OSError) as e:
                log.warning("initial peer %s unreachable: %s", addr, e)
                continue
            parsed = Multiaddr.parse(addr)
            contact = Contact(conn.peer_id.multihash, (str(parsed.without_peer_id()),))
            if await self.ping(contact):
                self._heard_from(contact)
                reached += 1
            else:
                log.warning("initial peer %s does not answer DHT requests", addr)
        if len(self.table):
            await self.find_node(node_id(self.peer_id))
        return reached

    async def _maintain(self) -> None:
        cfg = self.config
        while True:
            await asyncio.sleep(cfg.tick)
            now = self.clock()
            self.storage.expire(now)
            try:
                if not len(self.table) and self.initial_peers and now - self._last_bootstrap >= cfg.bootstrap_retry:
                    await self.bootstrap()
                await self._republish(now)
                for index in self.table.buckets_to_refresh(now, cfg.refresh_interval)[:4]:
                    if not len(self.table):
                        break
                    await self.find_node(random_id_in_bucket(self.table.own_id, index, os.urandom(32)))
                    self.table.mark_refreshed(index, now)
            except (ProtocolError, OSError) as e:  # maintenance must never stop
                log.warning("DHT maintenance step failed: %s", e)

    async def _republish(self, now: float) -> None:
        """spec/dht.md §8.4: re-send our own unexpired records every republish interval."""
        now_ms = to_ms(now)
        for slot, (record, last) in list(self._own.items()):
            if record.expiration <= now_ms:
                del self._own[slot]
            elif now - last >= self.config.republish_interval:
                await self._store_record(record)

    # ------------------------------------------------------------------ API

    async def store(self, key: str, subkey: bytes, value: bytes, expiration: float) -> StoreResult:
        """Sign and store ``value`` under (key, subkey) until ``expiration`` (unix seconds).

        Raises LocalProtocolError if the record breaks a limit (RECORD_TOO_LARGE, ...).
        The record is republished until it expires; storing the same (key, subkey) again
        with a later expiration replaces it (spec/dht.md §5.2).
        """
        record = sign_record(self.host.identity, key, subkey, value, to_ms(expiration))
        return await self._store_record(record)

    async def _store_record(self, record: Record) -> StoreResult:
        now = self.clock()
        self._own[(record.key, record.subkey)] = (record, now)
        kid = record.key_id
        contacts = (await self._lookup([kid], find_value=False))[kid].contacts
        accepted, rejected = 0, {}
        if not self.client_mode and self._among_closest(kid, contacts):
            try:
                self.storage.put(record, now)
                accepted += 1
            except ProtocolError as e:
                raise LocalProtocolError(e.code, e.message) from None
        request = StoreRequest((record,), self.sender_addrs)
        responses = await asyncio.gather(*(self._request(c, request) for c in contacts))
        for contact, response in zip(contacts, responses):
            if isinstance(response, StoreResponse) and response.statuses == (STATUS_OK,):
                accepted += 1
            elif isinstance(response, StoreResponse) and len(response.statuses) == 1:
                rejected[str(PeerId(contact.peer_id))] = response.statuses[0]
        return StoreResult(record, accepted, rejected)

    def _among_closest(self, kid: bytes, contacts: list[Contact]) -> bool:
        if len(contacts) < self.config.k:
            return True
        t = int.from_bytes(kid, "big")
        kth = int.from_bytes(node_id(contacts[-1].peer_id), "big") ^ t
        return int.from_bytes(self.table.own_id, "big") ^ t < kth

    async def get_records(self, keys: list[str]) -> dict[str, dict[bytes, Record]]:
        """Valid records of every key, from one batched traversal plus our own storage."""
        ids = {key_id(k): k for k in keys}
        results = await self._lookup(list(ids), find_value=True)
        now = self.clock()
        out: dict[str, dict[bytes, Record]] = {}
        for kid, key in ids.items():
            records = dict(results[kid].records)
            for r in self.storage.get(kid, now):  # already validated when stored
                if r.subkey not in records or r.expiration > records[r.subkey].expiration:
                    records[r.subkey] = r
            out[key] = records
        return out

    async def get(self, key: str) -> dict[bytes, tuple[bytes, float]]:
        """``{subkey: (value, expiration)}`` under ``key`` (expiration in unix seconds)."""
        return (await self.get_many([key]))[key]

    async def get_many(self, keys: list[str]) -> dict[str, dict[bytes, tuple[bytes, float]]]:
        """``{key: {subkey: (value, expiration)}}`` for many keys in one traversal (spec/dht.md §8.3)."""
        records = await self.get_records(list(dict.fromkeys(keys)))
        return {k: {s: (r.value, r.expiration_seconds) for s, r in recs.items()} for k, recs in records.items()}

    def statistics(self) -> dict[str, Any]:
        st = self.storage.statistics()
        return {
            "peer_id": str(self.host.peer_id),
            "contacts": len(self.table),
            "records": st.records,
            "keys": st.keys,
            "stored": st.stored,
            "rejected": st.rejected,
            "expired": st.expired,
            "own_records": len(self._own),
            "requests_handled": self.handler.requests_handled,
            "requests_refused_busy": self.handler.limiter.refused if self.handler.limiter is not None else 0,
            "contacts_refused_per_address": self.table.refused,
        }
