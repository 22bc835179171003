"""Announcing a node's blocks in the DHT: one signed record per block, refreshed.

See spec/announcement.md (the value) and spec/dht.md §6 (key ``"<model>.<block>"``,
subkey = the node's binary peer id). ``announcement_records`` decides what to store
(sans-IO); ``Announcer`` stores it through a ``dht.node.DHT`` every ``interval``
seconds and once more as ``OFFLINE`` when the node stops, with a short expiry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from biopetals.dht.ids import block_key
from biopetals.protocol.announcement import MAX_ANNOUNCED_ADDRS, Announcement, State, encode_announcement

__all__ = ["AnnouncementInfo", "announcement_records", "Announcer"]

log = logging.getLogger("biopetals.node")


@dataclass(frozen=True)
class AnnouncementInfo:
    """The parts of an announcement that do not change while the node runs."""

    model: str
    start: int
    end: int
    dtype: str
    quant: str
    version: str
    addrs: tuple[str, ...]
    adapters: tuple[str, ...] = ()  # server-side adapters (spec/messages.md §6.3)


def announcement_records(
    info: AnnouncementInfo, state: State, throughput: tuple[float, float], cache_tokens_left: int
) -> list[tuple[str, bytes]]:
    """``[(DHT key, value)]``, one per served block (spec/dht.md §6)."""
    value = encode_announcement(
        Announcement(
            state=state,
            start=info.start,
            end=info.end,
            inference_tps=float(throughput[0]),
            forward_tps=float(throughput[1]),
            cache_tokens_left=int(cache_tokens_left),
            dtype=info.dtype,
            quant=info.quant,
            version=info.version,
            addrs=info.addrs[:MAX_ANNOUNCED_ADDRS],
            adapters=info.adapters,
        )
    )
    return [(block_key(info.model, block), value) for block in range(info.start, info.end)]


class Announcer:
    """Stores the node's announcements through ``dht`` (a ``biopetals.dht.node.DHT``)."""

    def __init__(
        self,
        dht: Any,
        info: AnnouncementInfo,
        *,
        interval: float = 60.0,
        ttl: float = 180.0,
        offline_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.info = info
        self.interval = interval
        self.ttl = ttl
        self.offline_ttl = offline_ttl
        self.clock = clock
        self.state = State.JOINING
        self._last_expiration = 0.0

    async def announce(self, state: State, throughput: tuple[float, float], cache_tokens_left: int) -> int:
        """Store every block's record now; returns how many stores some node accepted."""
        self.state = state
        ttl = self.offline_ttl if state == State.OFFLINE else self.ttl
        # A stored record is replaced only by one that expires later (spec/dht.md §5.2),
        # so an offline record outlives the last online one (spec/announcement.md §2.2).
        expiration = max(self.clock() + ttl, self._last_expiration + 0.01)
        self._last_expiration = expiration
        subkey = self.dht.host.peer_id.multihash
        records = announcement_records(self.info, state, throughput, cache_tokens_left)
        results = await asyncio.gather(
            *(self.dht.store(key, subkey, value, expiration) for key, value in records), return_exceptions=True
        )
        ok = 0
        for result in results:
            if isinstance(result, BaseException):
                log.warning("announcing failed: %s", result)
            elif result.accepted:
                ok += 1
        return ok

    async def run(self, status: Callable[[], tuple[tuple[float, float], int]]) -> None:
        """Re-announce ``ONLINE`` every ``interval`` s with fresh numbers from ``status()``."""
        while True:
            await asyncio.sleep(self.interval)
            throughput, tokens_left = status()
            await self.announce(State.ONLINE, throughput, tokens_left)
