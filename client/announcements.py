"""Reading a model's block announcements from the DHT (spec/announcement.md).

Each node stores one signed record per block it serves, under the block's key with its own
peer id as subkey, all with the same value. ``read_announcements`` fetches the keys of all
blocks in batched traversals (``MAX_KEYS_PER_FIND`` keys per request) and returns one
announcement per node; records that do not decode are skipped (and logged), so one broken
or hostile node cannot hide the others.
"""

from __future__ import annotations

import asyncio
import logging

from biopetals.dht.ids import block_key
from biopetals.dht.node import DHT
from biopetals.dht.params import MAX_KEYS_PER_FIND
from biopetals.protocol.announcement import Announcement, decode_announcement
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.identity import PeerId

__all__ = ["read_announcements"]

log = logging.getLogger("biopetals.client")


async def read_announcements(dht: DHT, model_name: str, n_blocks: int) -> dict[str, Announcement]:
    """Peer id (base58) -> its announcement, for every node announcing a block of the model."""
    keys = [block_key(model_name, i) for i in range(n_blocks)]
    chunks = [keys[i : i + MAX_KEYS_PER_FIND] for i in range(0, len(keys), MAX_KEYS_PER_FIND)]
    results = await asyncio.gather(*(dht.get_many(chunk) for chunk in chunks))
    found: dict[str, Announcement] = {}
    for result in results:
        for records in result.values():
            for subkey, (value, _expiration) in records.items():
                try:
                    peer = str(PeerId.from_bytes(subkey))
                    if peer not in found:  # one record per block, all alike
                        found[peer] = decode_announcement(value)
                except ProtocolError as exc:
                    log.debug("ignoring an invalid announcement: %s", exc)
    return found
