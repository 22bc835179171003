"""Reading a model's block announcements from the DHT (spec/announcement.md).

``read_announcements`` returns one announcement per node: the one to route by
(``biopetals.dht.announcements.serving``: a node moving to other blocks keeps serving its
old span, announced ``online``, while its new span is ``joining``).
"""

from __future__ import annotations

from biopetals.dht.announcements import read_node_records, serving
from biopetals.dht.node import DHT
from biopetals.protocol.announcement import Announcement

__all__ = ["read_announcements"]


async def read_announcements(dht: DHT, model_name: str, n_blocks: int) -> dict[str, Announcement]:
    """Peer id (base58) -> its announcement, for every node announcing a block of the model."""
    return {peer: serving(records) for peer, records in (await read_node_records(dht, model_name, n_blocks)).items()}
