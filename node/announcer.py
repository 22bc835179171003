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
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

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
    public_name: str | None = None  # --public-name (spec/announcement.md §2, key 12)


def announcement_records(
    info: AnnouncementInfo, state: State, throughput: tuple[float, float], cache_tokens_left: int,
    blocks: Iterable[int] | None = None,
) -> list[tuple[str, bytes]]:
    """``[(DHT key, value)]``, one per served block (spec/dht.md §6), or per block of ``blocks``."""
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
            public_name=info.public_name,
        )
    )
    blocks = range(info.start, info.end) if blocks is None else blocks
    return [(block_key(info.model, block), value) for block in blocks]


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
        self.announced = False  # nothing stored yet: a relocation has no old blocks to leave
        #: While the node moves (node/relocation.py): the new span and its expected throughput;
        #: refreshes then keep the old-only blocks online and the new span joining.
        self.moving: tuple[AnnouncementInfo, tuple[float, float]] | None = None
        self._last_expiration = 0.0

    async def announce(self, state: State, throughput: tuple[float, float], cache_tokens_left: int, *,
                       info: AnnouncementInfo | None = None, blocks: Iterable[int] | None = None) -> int:
        """Store every block's record now; returns how many stores some node accepted.

        ``info``/``blocks``: another span's value, under some blocks only (a node changing its
        span, spec/announcement.md §2.3); the node's own state is then left as it is.
        """
        if info is None:
            self.state = state
            self.announced = True
        ttl = self.offline_ttl if state == State.OFFLINE else self.ttl
        # A stored record is replaced only by one that expires later (spec/dht.md §5.2),
        # so an offline record outlives the last online one (spec/announcement.md §2.2).
        expiration = max(self.clock() + ttl, self._last_expiration + 0.01)
        self._last_expiration = expiration
        subkey = self.dht.host.peer_id.multihash
        records = announcement_records(info or self.info, state, throughput, cache_tokens_left, blocks)
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

    async def relocate(self, start: int, end: int, state: State, throughput: tuple[float, float],
                       cache_tokens_left: int) -> None:
        """Announce blocks ``[start, end)`` instead of the current span (spec/announcement.md §2.3).

        The blocks left are announced ``offline`` (with the old span) first, then the new span
        with ``state``: its records expire later, so readers take them as the newest.
        """
        old = self.info
        left = [b for b in range(old.start, old.end) if not start <= b < end] if self.announced else []
        if left:
            await self.announce(State.OFFLINE, throughput, 0, info=old, blocks=left)
        self.info = replace(old, start=start, end=end)
        await self.announce(state, throughput, cache_tokens_left)

    async def run(self, status: Callable[[], tuple[tuple[float, float], int]]) -> None:
        """Re-announce every ``interval`` s with fresh numbers from ``status()`` (see ``refresh``)."""
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh(*status())

    async def refresh(self, throughput: tuple[float, float], tokens_left: int) -> None:
        """One re-announcement: ``ONLINE``; while moving, the old-only blocks ``ONLINE``, then the
        new span ``JOINING`` (stored last, so it is the newest record for balancing, §2.3)."""
        if self.moving is None:
            await self.announce(State.ONLINE, throughput, tokens_left)
            return
        new, expected = self.moving
        old_only = [b for b in range(self.info.start, self.info.end) if not new.start <= b < new.end]
        await self.announce(State.ONLINE, throughput, tokens_left, blocks=old_only)
        await self.announce(State.JOINING, expected, 0, info=new, blocks=range(new.start, new.end))
