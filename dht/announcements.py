"""Reading a model's block announcements from the DHT (spec/announcement.md §2.3).

Each node stores one signed record per block it serves, under the block's key with its own
peer id as subkey (spec/dht.md §6). Usually all of a node's records hold the same value;
while a node changes its span (spec/announcement.md §2.3) its records differ: the blocks it
is leaving say ``offline`` or still ``online`` (old span), the others ``joining`` (new span).
``read_node_records`` fetches the keys of all blocks in batched traversals
(``MAX_KEYS_PER_FIND`` keys per request) and returns, per node, its distinct values with
their expirations; ``newest`` and ``serving`` pick the one a reader needs. Records that do
not decode are skipped (and logged), so one broken or hostile node cannot hide the others.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from biopetals.protocol.announcement import Announcement, State, decode_announcement
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.identity import PeerId

from .ids import block_key
from .node import DHT
from .params import MAX_KEYS_PER_FIND

__all__ = ["NodeRecord", "read_node_records", "newest", "serving"]

log = logging.getLogger("biopetals.dht")


@dataclass(frozen=True)
class NodeRecord:
    """One distinct announcement of a node and the latest expiration it was stored with."""

    announcement: Announcement
    expiration: float


async def read_node_records(dht: DHT, model_name: str, n_blocks: int) -> dict[str, list[NodeRecord]]:
    """Peer id (base58) -> its distinct announcements, newest (latest expiration) first."""
    keys = [block_key(model_name, i) for i in range(n_blocks)]
    chunks = [keys[i : i + MAX_KEYS_PER_FIND] for i in range(0, len(keys), MAX_KEYS_PER_FIND)]
    results = await asyncio.gather(*(dht.get_many(chunk) for chunk in chunks))
    found: dict[str, dict[bytes, NodeRecord]] = {}
    for result in results:
        for records in result.values():
            for subkey, (value, expiration) in records.items():
                try:
                    peer = str(PeerId.from_bytes(subkey))
                    values = found.setdefault(peer, {})
                    seen = values.get(value)
                    if seen is None:
                        values[value] = NodeRecord(decode_announcement(value), expiration)
                    elif expiration > seen.expiration:
                        values[value] = NodeRecord(seen.announcement, expiration)
                except ProtocolError as exc:
                    log.debug("ignoring an invalid announcement: %s", exc)
    return {peer: sorted(values.values(), key=lambda r: -r.expiration) for peer, values in found.items() if values}


def newest(records: list[NodeRecord]) -> Announcement:
    """What the node says it is doing now: its latest announcement (balancing reads this)."""
    return max(records, key=lambda r: r.expiration).announcement


def serving(records: list[NodeRecord]) -> Announcement:
    """What a client may route through now: the latest ``online`` announcement, else the latest."""
    online = [r for r in records if r.announcement.state == State.ONLINE]
    return newest(online or records)
