"""Rebalancing a serving node: re-evaluate the swarm now and then, and move to other blocks.

See spec/announcement.md §2.3 and node/balancing.py (``should_move``, the decision).

``Rebalancer.run``: every ``interval`` x U(0.5, 1.5) s, read every node's newest
announcement, leave out the nodes that do not answer a ping (a node killed without a word
keeps its records until they expire; its blocks must not look served meanwhile), and ask
``should_move``. When it says move, ``Relocator.move``:

1. announce the new span ``joining`` (expected throughput: today's, scaled by the span
   lengths) under the new span's blocks; the blocks only the old span has keep their
   ``online`` records, so clients still route through the old span meanwhile;
2. load the new blocks (worker thread) and measure them (unless ``--no-benchmark``);
3. serve them: a new ``NodeService`` takes new streams; the old one keeps its open
   sessions (pushes for them are routed to it), and new sessions on the old blocks are
   refused with ``BLOCKS_NOT_SERVED``, so clients route elsewhere;
4. announce the old-only blocks ``offline`` and the new span ``online``;
5. drain: the old sessions end by themselves (their clients close them or they go idle)
   within ``drain_timeout``; those still open then get an ``UNKNOWN_SESSION`` error on
   their stream (the notice) and are closed: their clients fail over and replay their
   history on other nodes (spec/messages.md §5.9), so nothing they generate changes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable

from biopetals.dht.announcements import newest, read_node_records
from biopetals.dht.node import DHT
from biopetals.node.announcer import Announcer
from biopetals.node.balancing import should_move, spans_from_announcements
from biopetals.node.benchmark import span_throughput
from biopetals.node.handler import NodeService
from biopetals.protocol.announcement import Announcement, State
from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.messages import Error
from biopetals.transport.host import Host

if TYPE_CHECKING:
    from biopetals.models.blocks import BlockSpan
    from biopetals.node.options import NodeOptions

__all__ = ["Relocator", "Rebalancer", "live_announcements"]

log = logging.getLogger("biopetals.node")


class Relocator:
    """Holds the node's current ``NodeService`` and moves it to other blocks (module doc)."""

    def __init__(self, options: "NodeOptions", announcer: Announcer, service: NodeService,
                 build: Callable[["BlockSpan", tuple[float, float]], NodeService],
                 load: Callable[["NodeOptions"], "BlockSpan"], *, drain_timeout: float,
                 out: Callable[[str], None] = print) -> None:
        self.options = options
        self.announcer = announcer
        self.service = service
        self.build = build
        self.load = load
        self.drain_timeout = drain_timeout
        self.out = out
        self.moves = 0
        self._draining: set[asyncio.Task] = set()
        self._old: list[NodeService] = []

    @property
    def span(self) -> tuple[int, int]:
        return self.service.span.start, self.service.span.end

    async def move(self, start: int, end: int) -> None:
        old = self.service
        started = time.monotonic()
        old_len, new_len = old.span.end - old.span.start, end - start
        expected = (old.throughput[0] * old_len / new_len, old.throughput[1] * old_len / new_len)
        info = replace(self.announcer.info, start=start, end=end)
        self.announcer.moving = (info, expected)  # refreshes meanwhile keep both (Announcer.run)
        try:
            await self.announcer.announce(State.JOINING, expected, 0, info=info, blocks=range(start, end))
            loop = asyncio.get_running_loop()
            options = replace(self.options, start=start, end=end, progress=False)
            span = await loop.run_in_executor(None, self.load, options)
            throughput = (0.0, 0.0)
            if self.options.benchmark:
                throughput, _ = await loop.run_in_executor(None, span_throughput, self.options, span)  # or its cache
            new = self.build(span, throughput)
            new.previous = old
            new.install()  # new streams go to the new service from now on
            self.service = new
            self.options.start, self.options.end = start, end
            await self.announcer.relocate(start, end, State.ONLINE, throughput, new.budget.tokens_left)
        finally:
            self.announcer.moving = None
        self.moves += 1
        self.out(f"moved to blocks {start}:{end} (from {old.span.start}:{old.span.end}) in "
                 f"{time.monotonic() - started:.1f} s; {len(old.sessions)} session(s) draining")
        self.out(f"throughput: inference {throughput[0]:.1f} tokens/s, forward {throughput[1]:.1f} tokens/s")
        self._old.append(old)
        task = asyncio.create_task(self._drain(old, new))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain(self, old: NodeService, new: NodeService) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while len(old.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        if len(old.sessions):
            self.out(f"closing {len(old.sessions)} session(s) on the old blocks: their clients fail over")
            notice = Error(code=ErrorCode.UNKNOWN_SESSION,
                           message=f"this node moved to blocks {new.span.start}:{new.span.end}: session closed, "
                                   "replay it on another node")
            await asyncio.gather(*(session.owner.send(notice) for session in old.sessions.sessions()),
                                 return_exceptions=True)
        await self._close(old)
        if new.previous is old:
            new.previous = None

    async def _close(self, service: NodeService) -> None:
        if service in self._old:
            self._old.remove(service)
            await service.aclose()
            service.backend.shutdown()

    async def aclose(self) -> None:
        for task in list(self._draining):
            task.cancel()
        for service in list(self._old):
            await self._close(service)
        await self.service.aclose()
        self.service.backend.shutdown()


async def live_announcements(dht: DHT, host: Host, model: str, n_blocks: int, *,
                             timeout: float = 2.0) -> dict[str, Announcement]:
    """Every node's newest announcement, without the nodes that do not answer a ping."""
    me = str(host.peer_id)
    found = {peer: newest(records) for peer, records in (await read_node_records(dht, model, n_blocks)).items()}

    async def alive(peer: str, ann: Announcement) -> bool:
        if peer == me:
            return True
        try:
            peer_id = PeerId.from_base58(peer)
            for addr in ann.addrs:
                try:
                    host.add_address(peer_id, addr)
                    break
                except ProtocolError:
                    continue
            conn = await host.connect(peer_id, timeout=timeout)
            await conn.ping(timeout=timeout)
            return True
        except (ProtocolError, OSError, TimeoutError, ValueError) as exc:
            log.info("not counting %s: %s", peer, exc)
            return False
        except Exception as exc:  # a transport error of any kind: the node is not there for us
            log.info("not counting %s: %s", peer, exc)
            return False

    peers = [(p, a) for p, a in found.items() if a.state != State.OFFLINE]
    answers = await asyncio.gather(*(alive(p, a) for p, a in peers))
    return {p: a for (p, a), ok in zip(peers, answers) if ok}


class Rebalancer:
    """Re-evaluates the swarm's balance every ``interval`` x U(0.5, 1.5) s and moves (module doc)."""

    def __init__(self, dht: DHT, host: Host, relocator: Relocator, model: str, n_blocks: int, *,
                 quality: float, interval: float, rng: random.Random) -> None:
        self.dht = dht
        self.host = host
        self.relocator = relocator
        self.model = model
        self.n_blocks = n_blocks
        self.quality = quality
        self.interval = interval
        self.rng = rng

    async def check(self) -> tuple[int, int] | None:
        """One re-evaluation: the span to move to, or None."""
        me = str(self.host.peer_id)
        found = await live_announcements(self.dht, self.host, self.model, self.n_blocks)
        spans = spans_from_announcements(found, self.n_blocks)
        if not any(s.peer_id == me for s in spans):
            return None  # our own records are not readable yet
        return should_move(spans, me, self.n_blocks, self.rng, self.quality)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval * self.rng.uniform(0.5, 1.5))
            try:
                target = await self.check()
                if target is not None:
                    log.info("moving from blocks %d:%d to %d:%d", *self.relocator.span, *target)
                    await self.relocator.move(*target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the old blocks; try again next time
                log.warning("rebalancing failed: %s", exc, exc_info=True)
