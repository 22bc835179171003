"""Record storage of one DHT node: per-key subkey maps, expiry, replacement and limits.

See spec/dht.md §5. Time is an argument (unix seconds). ``put`` validates the
record (§4) before storing it; ``expire`` drops and returns what has expired.

Quotas (§5.4): a STORE's ``sender`` (the authenticated peer that sent it) and
source ``address`` are passed to ``put``. A peer-id subkey is accepted only from
its own signer; new records count against the writer's (signing key's) quota,
the sender's quota, and the number of distinct writers whose records came from
one source address. Our own records (no sender) are exempt.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

from . import params
from .ids import is_peer_id_subkey
from .records import Record, to_ms, validate


@dataclass
class StorageStats:
    records: int
    keys: int
    stored: int
    rejected: int
    expired: int


class Storage:
    """Records by key id, then subkey. At most one record per (key, subkey)."""

    def __init__(
        self,
        max_subkeys_per_key: int = params.MAX_SUBKEYS_PER_KEY,
        max_records: int = params.MAX_STORED_RECORDS,
        *,
        max_records_per_writer: int = params.MAX_RECORDS_PER_WRITER,
        max_records_per_sender: int = params.MAX_RECORDS_PER_SENDER,
        max_writers_per_address: int = params.MAX_WRITERS_PER_ADDRESS,
    ) -> None:
        self._by_key: dict[bytes, dict[bytes, Record]] = {}
        self._count = 0
        # (expiration_ms, key_id, subkey): lazy heap; stale entries are skipped on pop.
        self._heap: list[tuple[int, bytes, bytes]] = []
        self.max_subkeys_per_key = max_subkeys_per_key
        self.max_records = max_records
        self.max_records_per_writer = max_records_per_writer
        self.max_records_per_sender = max_records_per_sender
        self.max_writers_per_address = max_writers_per_address
        self._stored = self._rejected = self._expired = 0
        # Who each live record came from, and the quota counters over them (§5.4).
        self._origin: dict[tuple[bytes, bytes], tuple[bytes, bytes | None, str | None]] = {}
        self._per_writer: Counter[bytes] = Counter()
        self._per_sender: Counter[bytes] = Counter()
        self._address_writers: dict[str, Counter[bytes]] = {}

    def __len__(self) -> int:
        return self._count

    def put(self, record: Record, now: float, *, sender: bytes | None = None, address: str | None = None) -> bool:
        """Validate and store; True if stored, False if an equal/later copy is held.

        ``sender``: binary peer id that sent the STORE over its authenticated connection,
        ``address``: that connection's source IP (None for our own records).
        Raises RemoteProtocolError with the spec's code when the record is rejected.
        """
        try:
            validate(record, now)
            if sender is not None:
                check_sender(record, sender)
            stored = self._put_valid(record, now, sender, address)
        except RemoteProtocolError:
            self._rejected += 1
            raise
        if stored:
            self._stored += 1
        return stored

    def _put_valid(self, record: Record, now: float, sender: bytes | None, address: str | None) -> bool:
        now_ms = to_ms(now)
        kid = record.key_id
        subkeys = self._by_key.get(kid)
        old = subkeys.get(record.subkey) if subkeys is not None else None
        if old is not None and old.expiration <= now_ms:
            old = None  # expired but not yet collected: treat as absent
        if old is not None:
            if (
                not is_peer_id_subkey(record.subkey)
                and old.public_key != record.public_key
            ):
                raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "open subkey is held by another writer until it expires")
            if record.expiration <= old.expiration:
                return False
            subkeys[record.subkey] = record  # type: ignore[index]
            heapq.heappush(self._heap, (record.expiration, kid, record.subkey))
            return True
        # A new (key, subkey): collect expired records first so limits count live ones.
        self.expire(now)
        subkeys = self._by_key.get(kid)
        live_subkeys = len(subkeys) if subkeys else 0
        if live_subkeys >= self.max_subkeys_per_key:
            raise RemoteProtocolError(ErrorCode.TOO_MANY_RECORDS, f"key already holds {live_subkeys} subkeys")
        if self._count >= self.max_records:
            raise RemoteProtocolError(ErrorCode.TOO_MANY_RECORDS, f"node already stores {self._count} records")
        if sender is not None:
            self._check_quotas(record.public_key, sender, address)
        if subkeys is None:
            subkeys = self._by_key[kid] = {}
        if record.subkey not in subkeys:
            self._count += 1
        subkeys[record.subkey] = record
        self._count_origin(kid, record.subkey, record.public_key, sender, address)
        heapq.heappush(self._heap, (record.expiration, kid, record.subkey))
        return True

    def _check_quotas(self, writer: bytes, sender: bytes, address: str | None) -> None:
        """A new record from ``sender`` signed by ``writer``: within the quotas of §5.4?"""
        if self._per_writer[writer] >= self.max_records_per_writer:
            raise RemoteProtocolError(ErrorCode.TOO_MANY_RECORDS, f"this writer already has {self.max_records_per_writer} records here")
        if self._per_sender[sender] >= self.max_records_per_sender:
            raise RemoteProtocolError(ErrorCode.TOO_MANY_RECORDS, f"this sender already stored {self.max_records_per_sender} records here")
        writers = self._address_writers.get(address) if address is not None else None
        if writers is not None and writer not in writers and len(writers) >= self.max_writers_per_address:
            raise RemoteProtocolError(
                ErrorCode.TOO_MANY_RECORDS, f"{self.max_writers_per_address} writers already store records here from this address"
            )

    def _count_origin(self, kid: bytes, subkey: bytes, writer: bytes, sender: bytes | None, address: str | None) -> None:
        self._origin[(kid, subkey)] = (writer, sender, address)
        self._per_writer[writer] += 1
        if sender is not None:
            self._per_sender[sender] += 1
        if address is not None:
            self._address_writers.setdefault(address, Counter())[writer] += 1

    def _forget_origin(self, kid: bytes, subkey: bytes) -> None:
        origin = self._origin.pop((kid, subkey), None)
        if origin is None:
            return
        writer, sender, address = origin
        _decrement(self._per_writer, writer)
        if sender is not None:
            _decrement(self._per_sender, sender)
        if address is not None:
            writers = self._address_writers[address]
            _decrement(writers, writer)
            if not writers:
                del self._address_writers[address]

    def get(self, key_id: bytes, now: float) -> list[Record]:
        """Unexpired records under ``key_id`` (any order)."""
        subkeys = self._by_key.get(key_id)
        if not subkeys:
            return []
        now_ms = to_ms(now)
        return [r for r in subkeys.values() if r.expiration > now_ms]

    def expire(self, now: float) -> list[Record]:
        """Remove every record with ``expiration <= now`` and return them."""
        now_ms = to_ms(now)
        gone: list[Record] = []
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            exp, kid, subkey = heapq.heappop(heap)
            subkeys = self._by_key.get(kid)
            record = subkeys.get(subkey) if subkeys else None
            if record is None or record.expiration != exp:
                continue  # replaced by a later record; its own heap entry stays
            del subkeys[subkey]  # type: ignore[union-attr]
            self._count -= 1
            self._forget_origin(kid, subkey)
            if not subkeys:
                del self._by_key[kid]
            gone.append(record)
        self._expired += len(gone)
        return gone

    def next_expiration(self) -> float | None:
        """When ``expire`` next has work (unix seconds), for the caller's timer."""
        return self._heap[0][0] / 1000.0 if self._heap else None

    def all_records(self, now: float) -> list[Record]:
        now_ms = to_ms(now)
        return [r for subkeys in self._by_key.values() for r in subkeys.values() if r.expiration > now_ms]

    def statistics(self) -> StorageStats:
        return StorageStats(self._count, len(self._by_key), self._stored, self._rejected, self._expired)


def check_sender(record: Record, sender: bytes) -> None:
    """A record under a peer-id subkey is taken only from its own signer (spec/dht.md §5.4)."""
    if is_peer_id_subkey(record.subkey) and record.signer_peer_id != sender:
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "a peer-id subkey is accepted only from its own signer (spec/dht.md §5.4)")


def _decrement(counter: Counter[bytes], key: bytes) -> None:
    if counter[key] <= 1:
        counter.pop(key, None)
    else:
        counter[key] -= 1
