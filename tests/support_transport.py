"""Shared helpers of the transport tests: two hosts on loopback, connected."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Awaitable, Callable

from biopetals.protocol.identity import Identity, PeerId
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host

SWARM = os.urandom(32)
FAST = TransportConfig(keepalive_interval=0)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def pair(body: Callable[[Host, Host, PeerId], Awaitable[None]]) -> None:
    """``body(server, client, server_peer_id)`` with the client already connected to the server."""
    async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
        Identity.generate(), swarm_key=SWARM, config=FAST
    ) as client:
        (addr,) = await server.listen("127.0.0.1", 0)
        conn = await client.connect(addr)
        await body(server, client, conn.peer_id)
