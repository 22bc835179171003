"""What a swarm serves for a model, node by node: read from the DHT (and each node's NodeInfo).

The library side of ``biopetals-swarm`` (client/status.py, the program) that the API's swarm
view (api/swarm_view.py) also uses; importing it sets nothing in the process.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from biopetals.dht.node import DHT
from biopetals.protocol.announcement import Announcement, State
from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.messages import Error, NodeInfo, NodeInfoRequest, decode_message, encode_message
from biopetals.transport.host import Host

from .announcements import read_announcements
from .errors import describe_code
from .routing import ServerSpan
from .span_session import dial_target

__all__ = ["NodeStatus", "SwarmStatus", "read_status", "to_json", "format_text"]


@dataclass(frozen=True)
class NodeStatus:
    peer_id: str
    announcement: Announcement
    info: NodeInfo | None = None  # with --node-info, if the node answered
    info_error: str | None = None  # why it did not

    @property
    def online(self) -> bool:
        return self.announcement.state == State.ONLINE


@dataclass(frozen=True)
class SwarmStatus:
    model: str
    n_blocks: int
    nodes: tuple[NodeStatus, ...]  # by first block, then peer id

    def online_per_block(self) -> list[int]:
        """How many online nodes serve each block."""
        counts = [0] * self.n_blocks
        for node in self.nodes:
            if node.online:
                for block in range(node.announcement.start, min(node.announcement.end, self.n_blocks)):
                    counts[block] += 1
        return counts

    def throughput_per_block(self) -> list[float]:
        """Per block: the sum of the announced inference tokens/s of its online nodes
        (spec/announcement.md §5); the smallest is the swarm's bottleneck."""
        out = [0.0] * self.n_blocks
        for node in self.nodes:
            if node.online:
                for block in range(node.announcement.start, min(node.announcement.end, self.n_blocks)):
                    out[block] += node.announcement.inference_tps
        return out

    def coverage_runs(self) -> list[tuple[int, int, int, float]]:
        """``(start, end, online nodes, tokens/s)`` for each run of blocks served alike."""
        runs: list[tuple[int, int, int, float]] = []
        for block, (count, tps) in enumerate(zip(self.online_per_block(), self.throughput_per_block())):
            if runs and runs[-1][2:] == (count, tps):
                runs[-1] = (runs[-1][0], block + 1, count, tps)
            else:
                runs.append((block, block + 1, count, tps))
        return runs

    def missing(self) -> list[tuple[int, int]]:
        """Ranges [start, end) of blocks that no online node serves."""
        out: list[tuple[int, int]] = []
        for block, count in enumerate(self.online_per_block()):
            if count:
                continue
            if out and out[-1][1] == block:
                out[-1] = (out[-1][0], block + 1)
            else:
                out.append((block, block + 1))
        return out


async def read_status(host: Host, dht: DHT, model: str, n_blocks: int, *, node_info: bool = False,
                      timeout: float = 5.0) -> SwarmStatus:
    """The swarm's announcements for ``model`` (and each node's NodeInfo if ``node_info``)."""
    found = await read_announcements(dht, model, n_blocks)
    nodes = [NodeStatus(peer, ann) for peer, ann in found.items()]
    if node_info:
        nodes = list(await asyncio.gather(*(_with_info(host, node, timeout) for node in nodes)))
    nodes.sort(key=lambda n: (n.announcement.start, n.announcement.end, n.peer_id))
    return SwarmStatus(model, n_blocks, tuple(nodes))


async def _with_info(host: Host, node: NodeStatus, timeout: float) -> NodeStatus:
    ann = node.announcement
    target = dial_target(ServerSpan(node.peer_id, ann.start, ann.end, addrs=tuple(ann.addrs)))
    try:
        data = await host.call(target, PROTOCOL_NAME, encode_message(NodeInfoRequest()), timeout=timeout)
        reply = decode_message(data, expected=(NodeInfo, Error))
    except (ProtocolError, OSError) as exc:
        return NodeStatus(node.peer_id, ann, info_error=str(exc))
    if isinstance(reply, Error):
        return NodeStatus(node.peer_id, ann, info_error=f"{describe_code(reply.code)}: {reply.message}")
    return NodeStatus(node.peer_id, ann, info=reply)


# ----------------------------------------------------------------------------- output


def to_json(status: SwarmStatus) -> dict[str, Any]:
    def node(n: NodeStatus) -> dict[str, Any]:
        a = n.announcement
        out: dict[str, Any] = {
            "peer_id": n.peer_id, "start": a.start, "end": a.end, "state": a.state.name, "dtype": a.dtype,
            "quant": a.quant, "version": a.version, "inference_tps": a.inference_tps, "forward_tps": a.forward_tps,
            "cache_tokens_left": a.cache_tokens_left, "addrs": list(a.addrs), "adapters": list(a.adapters),
        }
        if n.info is not None:
            out["node_info"] = {k: getattr(n.info, k) for k in
                                ("sessions_open", "decode_steps", "batched_steps", "uptime", "cache_tokens_left")}
        if n.info_error is not None:
            out["node_info_error"] = n.info_error
        return out

    return {
        "model": status.model,
        "blocks": status.n_blocks,
        "nodes": [node(n) for n in status.nodes],
        "online_per_block": status.online_per_block(),
        "throughput_per_block": status.throughput_per_block(),
        "missing": [list(r) for r in status.missing()],
    }


def format_text(status: SwarmStatus) -> str:
    online = sum(n.online for n in status.nodes)
    lines = [f"model {status.model}: {status.n_blocks} blocks, {len(status.nodes)} nodes announced, {online} online"]
    header = ["blocks", "peer id", "state", "dtype", "tok/s inf / fwd", "cache left", "address"]
    with_info = any(n.info is not None or n.info_error is not None for n in status.nodes)
    if with_info:
        header[-1:-1] = ["sessions", "uptime"]
    rows = [header]
    for n in status.nodes:
        a = n.announcement
        dtype = a.dtype if a.quant == "none" else f"{a.dtype}/{a.quant}"
        address = a.addrs[0].split("/p2p/")[0] if a.addrs else "-"  # the peer id has its own column
        row = [f"{a.start}:{a.end}", n.peer_id, a.state.name, dtype, f"{a.inference_tps:.1f} / {a.forward_tps:.0f}",
               str(a.cache_tokens_left), address]
        if with_info:
            if n.info is not None:
                sessions = "-" if n.info.sessions_open is None else str(n.info.sessions_open)
                uptime = "-" if n.info.uptime is None else _duration(n.info.uptime)
            else:
                sessions, uptime = "?", "?"
            row[-1:-1] = [sessions, uptime]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    for n in status.nodes:
        if n.announcement.adapters:  # server-side LoRA adapters (spec/messages.md §6.3)
            lines.append(f"  adapters of {n.peer_id}: {', '.join(n.announcement.adapters)}")
    for n in status.nodes:
        if n.info_error is not None:
            lines.append(f"  no NodeInfo from {n.peer_id}: {n.info_error}")
    lines.append("coverage per block (online nodes, announced inference tokens/s):")
    for start, end, count, tps in status.coverage_runs():
        blocks = f"{start}" if end - start == 1 else f"{start}:{end}"
        lines.append(f"  {blocks:>9}  {'#' * min(count, 40) or '-':<10} {count} node{'s' if count != 1 else ''}, "
                     f"{tps:.1f} tokens/s")
    missing = status.missing()
    if missing:
        ranges = ", ".join(f"{s}:{e}" for s, e in missing)
        lines.append(f"NOT SERVED: blocks {ranges} have no online node")
    else:
        counts = status.online_per_block()
        lines.append(f"all {status.n_blocks} blocks served (online nodes per block: {min(counts)} to {max(counts)}; "
                     f"bottleneck {min(status.throughput_per_block()):.1f} tokens/s)")
    return "\n".join(lines)



def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- command line
