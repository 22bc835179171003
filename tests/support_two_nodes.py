"""A test module's two real nodes over its ``checkpoint`` fixture, and an f32 client of them.

Shared by the real-process client tests that run the same two-node swarm (blocks 0:4 and 4:8
of an 8-layer tiny checkpoint, tests/support_models.py) and differ only in the checkpoint and
the client's options::

    from support_two_nodes import f32_client, swarm  # noqa: F401 (``swarm`` is a fixture)

    @pytest.fixture(scope="module")
    def checkpoint(tmp_path_factory): ...

    @pytest.fixture(scope="module")
    def model(checkpoint, swarm):
        m = f32_client(checkpoint, swarm, step_timeout=30.0)
        yield m
        m.close()
"""

from __future__ import annotations

import pytest

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm

__all__ = ["f32_client", "swarm"]


@pytest.fixture(scope="module")
def swarm(checkpoint):
    """Two ``biopetals-node`` processes on 127.0.0.1 serving blocks 0:4 and 4:8 of ``checkpoint``."""
    with LocalSwarm(checkpoint, [(0, 4), (4, 8)]) as s:
        yield s


def f32_client(checkpoint, swarm: LocalSwarm, **options):
    """A client of ``swarm`` with lossless (f32) activations and ``options`` (``ClientConfig`` fields)."""
    return AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                           swarm_key=swarm.key_path, codec="f32", **options)
