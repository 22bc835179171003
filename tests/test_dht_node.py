"""The asyncio DHT node in one process over real loopback sockets (dht/node.py)."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import pytest

from biopetals.dht.ids import block_key
from biopetals.dht.node import DHT, DHTConfig
from biopetals.protocol.errors import ErrorCode, LocalProtocolError
from biopetals.protocol.identity import Identity
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.host import Host

KEY = SwarmKey.generate()
FAST = DHTConfig(request_timeout=2.0)


async def _node(stack: AsyncExitStack, initial: list[str], client: bool = False) -> DHT:
    host = await stack.enter_async_context(Host(Identity.generate(), swarm_key=KEY))
    if not client:
        await host.listen("127.0.0.1", 0)
    return await stack.enter_async_context(DHT(host, initial_peers=initial, config=FAST, client_mode=client))


def test_single_node_swarm_stores_and_gets_locally() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            dht = await _node(stack, [])
            result = await dht.store("m.0", dht.peer_id, b"v", time.time() + 30)
            assert result.accepted == 1
            assert (await dht.get("m.0"))[dht.peer_id][0] == b"v"
            with pytest.raises(LocalProtocolError) as info:
                await dht.store("m.0", dht.peer_id, b"x" * 5000, time.time() + 30)
            assert info.value.code == ErrorCode.RECORD_TOO_LARGE

    asyncio.run(main())


def test_three_nodes_and_a_client() -> None:
    async def main() -> None:
        async with AsyncExitStack() as stack:
            a = await _node(stack, [])
            addr = str(a.host.addrs[0])
            b = await _node(stack, [addr])
            c = await _node(stack, [addr])
            client = await _node(stack, [addr], client=True)
            expiration = time.time() + 30
            blocks = [block_key("org/model", i) for i in range(40)]
            for key in blocks:
                await b.store(key, b.peer_id, b"b-serves", expiration)
            await c.store(blocks[0], c.peer_id, b"c-serves", expiration)
            found = await client.get_many(blocks)
            assert found[blocks[0]] == {b.peer_id: (b"b-serves", pytest.approx(expiration, abs=0.002)),
                                        c.peer_id: (b"c-serves", pytest.approx(expiration, abs=0.002))}
            assert all(found[k] == {b.peer_id: (b"b-serves", pytest.approx(expiration, abs=0.002))} for k in blocks[1:])
            # a client sends no addresses: it stays out of every routing table
            for node in (a, b, c):
                assert client.peer_id not in node.table and len(node.table) == 2

    asyncio.run(main())
