"""Clients spread their sessions over nodes serving the same blocks (real node processes, loopback)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from biopetals.client import AutoDistributedModelForCausalLM, InferenceSession
from biopetals.protocol.messages import NodeInfo, NodeInfoRequest
from support_models import tiny_llama_checkpoint  # noqa: F401  (fixture)
from support_swarm import RawClient, Swarm

pytestmark = pytest.mark.timeout(300)


async def _sessions_open(swarm: Swarm, addrs: list[str]) -> list[int]:
    async with RawClient(swarm.swarm_key) as client:
        infos = [await client.request(addr, NodeInfoRequest()) for addr in addrs]
    assert all(isinstance(i, NodeInfo) for i in infos), infos
    return [i.sessions_open for i in infos]


def test_sessions_spread_over_two_replicas(tmp_path, tiny_llama_checkpoint):  # noqa: F811
    """Two nodes serve all 8 blocks alike: 4 sessions opened one after another go 2 and 2
    (each route sees the sessions already open), not 4 on the first."""
    with Swarm(tmp_path) as swarm:
        # equal announced throughput (none measured), so that the load alone decides; a generous
        # probe deadline, so that a busy machine's slow NodeInfo answers still count
        nodes = [swarm.start_node(tiny_llama_checkpoint, "0:8", "--num-threads", "1", "--no-benchmark")
                 for _ in range(2)]
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_checkpoint, initial_peers=swarm.initial_peers,
                                                                swarm_key=swarm.key_path, codec="f32",
                                                                rtt_probe_timeout=10.0)
        try:
            hidden = torch.randn(1, 3, model.config.hidden_size)
            sessions = [InferenceSession(model.swarm, max_length=16) for _ in range(4)]
            for session in sessions:
                session.step(hidden)
            routes = [session.route[0][0][0] for session in sessions]
            counts = asyncio.run(_sessions_open(swarm, [n.addr for n in nodes]))
            assert counts == [2, 2], (counts, routes)
            assert sorted(routes.count(n.peer_id) for n in nodes) == [2, 2]
            for session in sessions:
                session.close()
        finally:
            model.close()
