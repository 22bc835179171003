"""Kademlia routing table: 256 k-buckets in least-recently-seen order with replacement caches.

See spec/dht.md §1.4 and §8.1. Sans-IO: the table never pings anyone.
``add_or_update`` returns the least-recently-seen contact of a full bucket, and
the caller pings it, then reports back with ``add_or_update`` (it answered) or
``remove`` (it failed; the newest cached contact takes its place).

Contacts enter only from authenticated connections (a request's sender, or a peer
that answered us), and ``address`` - the source IP of that connection - is counted:
at most ``max_per_address`` contacts and replacements together per address, so one
host's identities cannot fill the table (spec/dht.md §8.1).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from . import params
from .ids import ID_BITS, distance, node_id
from .messages import Contact


@dataclass
class _Bucket:
    contacts: OrderedDict[bytes, Contact]  # peer id -> contact, head = least recently seen
    replacements: OrderedDict[bytes, Contact]  # newest last
    last_touched: float = 0.0


class RoutingTable:
    """Contacts by bucket, keyed by binary peer id. Node ids are SHA-256 of peer ids."""

    def __init__(self, own_peer_id: bytes, k: int = params.K, *, max_per_address: int = params.MAX_CONTACTS_PER_ADDRESS) -> None:
        self.own_peer_id = own_peer_id
        self.own_id = node_id(own_peer_id)
        self._own_int = int.from_bytes(self.own_id, "big")
        self.k = k
        self._buckets = [_Bucket(OrderedDict(), OrderedDict()) for _ in range(ID_BITS)]
        self._ids: dict[bytes, int] = {}  # peer id -> node id as an int, for every contact in a bucket
        self.max_per_address = max_per_address
        self._address: dict[bytes, str] = {}  # peer id -> source address, for contacts and replacements
        self._per_address: Counter[str] = Counter()
        self.refused = 0  # new contacts refused for their address, since start

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, peer_id: bytes) -> bool:
        return peer_id in self._ids

    def _bucket_of(self, peer_id: bytes) -> tuple[int, int]:
        nid = self._ids.get(peer_id)
        if nid is None:
            nid = int.from_bytes(node_id(peer_id), "big")
        return ID_BITS - (nid ^ self._own_int).bit_length(), nid

    def add_or_update(self, contact: Contact, now: float, address: str | None = None) -> Contact | None:
        """Record that we heard from ``contact`` (over a connection from ``address``). Returns a contact to ping, or None.

        Known contact: moved to the tail (addresses updated). Room in the bucket:
        appended. Full bucket: ``contact`` goes to the replacement cache and the
        bucket's least-recently-seen contact is returned for the caller to ping.
        A new contact from an address that already has ``max_per_address`` is refused.
        """
        if contact.peer_id == self.own_peer_id:
            return None
        index, nid = self._bucket_of(contact.peer_id)
        bucket = self._buckets[index]
        bucket.last_touched = now
        if contact.peer_id in bucket.contacts:
            old = bucket.contacts.pop(contact.peer_id)
            bucket.contacts[contact.peer_id] = contact if contact.addrs else old
            return None
        if contact.peer_id not in self._address and address is not None:
            if self._per_address[address] >= self.max_per_address:
                self.refused += 1
                return None
            self._address[contact.peer_id] = address
            self._per_address[address] += 1
        if len(bucket.contacts) < self.k:
            bucket.contacts[contact.peer_id] = contact
            self._ids[contact.peer_id] = nid
            bucket.replacements.pop(contact.peer_id, None)
            return None
        bucket.replacements.pop(contact.peer_id, None)
        bucket.replacements[contact.peer_id] = contact
        while len(bucket.replacements) > self.k:
            self._forget_address(bucket.replacements.popitem(last=False)[0])
        return next(iter(bucket.contacts.values()))

    def _forget_address(self, peer_id: bytes) -> None:
        address = self._address.pop(peer_id, None)
        if address is not None:
            self._per_address[address] -= 1
            if self._per_address[address] <= 0:
                del self._per_address[address]

    def remove(self, peer_id: bytes) -> Contact | None:
        """Drop a failed contact; the newest replacement takes its place (returned)."""
        if peer_id not in self._ids:
            return None
        index, _ = self._bucket_of(peer_id)
        bucket = self._buckets[index]
        del bucket.contacts[peer_id]
        del self._ids[peer_id]
        self._forget_address(peer_id)
        if bucket.replacements:
            pid, promoted = bucket.replacements.popitem(last=True)
            bucket.contacts[pid] = promoted
            self._ids[pid] = self._bucket_of(pid)[1]
            return promoted
        return None

    def get(self, peer_id: bytes) -> Contact | None:
        if peer_id not in self._ids:
            return None
        return self._buckets[self._bucket_of(peer_id)[0]].contacts.get(peer_id)

    def closest(self, target: bytes, count: int | None = None, exclude: bytes | None = None) -> list[Contact]:
        """Up to ``count`` (default k) contacts closest to ``target``, closest first."""
        count = self.k if count is None else count
        t = int.from_bytes(target, "big")
        ranked = sorted(
            (nid ^ t, pid) for pid, nid in self._ids.items() if pid != exclude
        )[:count]
        return [self.get(pid) for _, pid in ranked]  # type: ignore[misc]

    def contacts(self) -> list[Contact]:
        return [c for b in self._buckets for c in b.contacts.values()]

    def touch_bucket(self, target: bytes, now: float) -> None:
        """A lookup for ``target`` refreshes the bucket the target falls in."""
        if target != self.own_id:
            self._buckets[ID_BITS - distance(self.own_id, target).bit_length()].last_touched = now

    def mark_refreshed(self, index: int, now: float) -> None:
        """A refresh lookup for bucket ``index`` ran (whatever it found)."""
        self._buckets[index].last_touched = now

    def buckets_to_refresh(self, now: float, interval: float = params.REFRESH_INTERVAL) -> list[int]:
        """Indices of non-empty-range buckets not touched for ``interval`` seconds.

        Only buckets up to one past the deepest non-empty one are considered: deeper
        buckets cover ranges that almost surely hold no node at all.
        """
        deepest = max((i for i, b in enumerate(self._buckets) if b.contacts), default=-1)
        return [i for i in range(min(deepest + 2, ID_BITS)) if now - self._buckets[i].last_touched >= interval]

    def bucket_sizes(self) -> dict[int, int]:
        return {i: len(b.contacts) for i, b in enumerate(self._buckets) if b.contacts}
