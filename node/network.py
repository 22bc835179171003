"""A node's network, opened first: listen, join the swarm, start the DHT (issue 23 item 5).

``open_network`` needs none of the heavy libraries (torch, transformers): node/cli.py opens it
before importing them, so that other nodes can join the swarm through this one (its ``DHT``
line) while it still imports and loads its blocks; ``run_node`` (node/server.py) then serves
on it. What the node announces and says on the wire is the same either way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from biopetals.dht.node import DHT
from biopetals.node.options import NodeOptions
from biopetals.node.startup_trace import mark
from biopetals.protocol.errors import ErrorCode
from biopetals.transport.addresses import announce_addrs
from biopetals.transport.host import Host
from biopetals.transport.joining import NEW_SWARM_HINT, JoinError, require_join

__all__ = ["NodeNetwork", "open_network"]


@dataclass(frozen=True)
class NodeNetwork:
    host: Host
    dht: DHT
    addrs: list[str]  # the announced multiaddrs, with /p2p/<peer id>


@contextlib.asynccontextmanager
async def open_network(options: NodeOptions) -> AsyncIterator[NodeNetwork]:
    """Listen on ``options.host:port``, dial the initial peers, run the DHT; closed on exit."""
    async with Host(options.identity, swarm_key=options.swarm_key) as host:
        await host.listen(options.host, options.port)
        mark("listening")
        addrs = [str(a) for a in announce_addrs(options.announce, host.addrs, host.peer_id)]
        await require_join(host, options.initial_peers, timeout=10.0, alone_hint=NEW_SWARM_HINT)
        async with DHT(host, initial_peers=options.initial_peers,
                       announce_addrs=[a.rsplit("/p2p/", 1)[0] for a in addrs]) as dht:
            if options.initial_peers and not len(dht.table):
                raise JoinError(ErrorCode.UNKNOWN_PROTOCOL,
                                "cannot join the swarm: the initial peers accept our key but answer no DHT request "
                                f"({', '.join(options.initial_peers)}); give the address of a biopetals-node or "
                                "biopetals-dht of the swarm, or --new-swarm to start a new swarm alone", ())
            mark("dht-joined")
            yield NodeNetwork(host, dht, addrs)
