"""The data of the page's swarm view: every block of the model, the nodes serving it, their load.

``SwarmView.snapshot()`` reads the model's announcements from the DHT and asks every node
for its ``NodeInfo`` (open sessions, decode steps, cache left), through the engine's own
client network (``client.swarm_status.read_status`` on the swarm's event loop), at most once
per ``max_age`` seconds however many pages poll. Blocks with no online node are listed
in ``missing``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from biopetals.client.swarm_status import read_status, to_json

__all__ = ["SwarmView"]


class SwarmView:
    def __init__(self, engine: Any, max_age: float = 1.0, timeout: float = 3.0) -> None:
        self.engine = engine
        self.max_age = max_age
        self.timeout = timeout
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, Any]:
        async with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > self.max_age:
                self._cached = (time.monotonic(), await self._read())
            return self._cached[1]

    async def _read(self) -> dict[str, Any]:
        swarm = self.engine.swarm
        future = swarm.loop.submit(read_status(swarm.host, swarm.dht, swarm.model_name, swarm.n_blocks,
                                               node_info=True, timeout=self.timeout))
        try:
            status = await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + 10)
        except Exception as exc:
            return {"model": self.engine.served_name, "blocks": swarm.n_blocks, "nodes": [],
                    "online_per_block": [0] * swarm.n_blocks, "missing": [[0, swarm.n_blocks]],
                    "error": f"could not read the swarm: {type(exc).__name__}: {exc}", **self._server()}
        data = to_json(status)
        # an announcement outlives a node killed without a word: a node that does not answer
        # NodeInfo is shown as UNREACHABLE and does not count as serving its blocks
        for node in data["nodes"]:
            if "node_info_error" in node and node["state"] == "ONLINE":
                node["state"] = "UNREACHABLE"
        counts = [sum(1 for n in data["nodes"] if n["state"] == "ONLINE" and n["start"] <= b < n["end"])
                  for b in range(swarm.n_blocks)]
        data["online_per_block"] = counts
        data["missing"] = _ranges([b for b, c in enumerate(counts) if c == 0])
        data["swarm_name"] = data.pop("model")
        data["model"] = self.engine.served_name
        data["per_block"] = [[n["peer_id"] for n in data["nodes"] if n["start"] <= b < n["end"]]
                             for b in range(swarm.n_blocks)]
        return {**data, **self._server()}

    def _server(self) -> dict[str, Any]:
        return {"api_sessions_active": self.engine.active, "api_sessions_max": self.engine.max_sessions,
                "read_at": time.time()}


def _ranges(blocks: list[int]) -> list[list[int]]:
    """``[[start, end), ...]`` of consecutive ``blocks``."""
    out: list[list[int]] = []
    for b in blocks:
        if out and out[-1][1] == b:
            out[-1][1] = b + 1
        else:
            out.append([b, b + 1])
    return out
