"""Choosing a node's blocks when it joins (``--num-blocks``): read the swarm, announce, settle.

The I/O around the sans-IO choice (node/balancing.py). See spec/announcement.md §2.3.

1. Read every node's newest announcement (``joining`` ones included) with one batched DHT
   traversal, and choose the span of ``num_blocks`` blocks that most raises the swarm's
   bottleneck throughput, with this node's expected throughput added
   (``balancing.choose_best_span``).
2. Announce ``joining`` on it at once, with the expected throughput, so that later joiners
   count this node.
3. Joiners that read the swarm at the same moment chose alike: after a random wait
   (``settle`` x U(0.5, 1.5) s) read again and let ``balancing.resolve_join`` decide, by
   peer-id order, who moves out of whose way; re-announce when moving. Stop after
   ``stable_rounds`` looks in a row without a move (or ``max_rounds`` looks).

The caller then loads the chosen blocks and announces ``online``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from biopetals.dht.announcements import newest, read_node_records
from biopetals.dht.node import DHT
from biopetals.node.announcer import Announcer
from biopetals.node.balancing import ServedSpan, choose_best_span, resolve_join, spans_from_announcements
from biopetals.node.benchmark import span_throughput
from biopetals.protocol.announcement import State

if TYPE_CHECKING:
    from biopetals.models.blocks import BlockSpan
    from biopetals.node.options import NodeOptions

__all__ = ["JoinParams", "read_spans", "balancing_throughput", "join_swarm", "place_node"]

log = logging.getLogger("biopetals.node")


@dataclass(frozen=True)
class JoinParams:
    settle: float = 1.0  # s, mean wait between announcing and looking again
    stable_rounds: int = 2  # looks in a row without a move that end the settling
    max_rounds: int = 8


async def read_spans(dht: DHT, model: str, n_blocks: int) -> list[ServedSpan]:
    """Every node's newest announcement as a ``ServedSpan`` (``offline`` nodes left out)."""
    records = await read_node_records(dht, model, n_blocks)
    return spans_from_announcements({peer: newest(recs) for peer, recs in records.items()}, n_blocks)


def balancing_throughput(own: float, spans: list[ServedSpan]) -> float:
    """This node's throughput for the choice: measured, else the mean of the others' (1.0 if none)."""
    if own > 0:
        return own
    return sum(s.throughput for s in spans) / len(spans) if spans else 1.0


async def join_swarm(dht: DHT, announcer: Announcer, model: str, n_blocks: int, num_blocks: int,
                     throughput: tuple[float, float], rng: random.Random,
                     params: JoinParams = JoinParams()) -> tuple[int, int]:
    """Choose, announce ``joining`` and settle (module doc); returns ``(start, end)``.

    ``throughput``: the expected (inference, forward) tokens/s over ``num_blocks`` blocks
    (0, 0 when not measured).
    """
    me = str(dht.host.peer_id)
    spans = [s for s in await read_spans(dht, model, n_blocks) if s.peer_id != me]
    own = balancing_throughput(throughput[0], spans)
    span = choose_best_span(spans, n_blocks, num_blocks, own, rng)
    log.info("chose blocks %d:%d among %d nodes", span[0], span[1], len(spans))
    await announcer.relocate(span[0], span[1], State.JOINING, throughput, 0)
    stable = 0
    for _ in range(params.max_rounds):
        await asyncio.sleep(params.settle * rng.uniform(0.5, 1.5))
        spans = await read_spans(dht, model, n_blocks)
        better = resolve_join(spans, me, span, n_blocks, balancing_throughput(throughput[0], spans), rng)
        if better is None:
            stable += 1
            if stable >= params.stable_rounds:
                break
            continue
        log.info("blocks %d:%d: an earlier joiner took them; moving to %d:%d", *span, *better)
        stable = 0
        span = better
        await announcer.relocate(span[0], span[1], State.JOINING, throughput, 0)
    return span


async def place_node(options: "NodeOptions", dht: DHT, announcer: Announcer, model: str, n_blocks: int,
                     num_blocks: int, load: Callable[["NodeOptions"], "BlockSpan"],
                     rng: random.Random) -> tuple[tuple[int, int], tuple[float, float]]:
    """Expected throughput from one block (``load`` + the start-up benchmark or its cache,
    unless ``--no-benchmark``), then ``join_swarm``. Returns the span and the expected throughput."""
    throughput = (0.0, 0.0)
    if options.benchmark:
        loop = asyncio.get_running_loop()
        one = await loop.run_in_executor(None, load, replace(options, start=0, end=1, progress=False))
        per_block, _ = await loop.run_in_executor(None, span_throughput, options, one)
        del one
        throughput = (per_block[0] / num_blocks, per_block[1] / num_blocks)
    params = JoinParams(settle=options.join_settle)
    return await join_swarm(dht, announcer, model, n_blocks, num_blocks, throughput, rng, params), throughput
