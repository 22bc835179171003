"""``biopetals-node --metrics-port`` (node/metrics.py): Prometheus metrics through prometheus_client.

A real node process; a real scrape over HTTP on 127.0.0.1; a request the node refuses
(a model it does not serve) must show in ``error_replies_total``, an open session in
``sessions_open``, a Forward's rows x positions in ``tokens_total``.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest
import torch

from support_models import make_tiny_checkpoint
from support_swarm import RawClient, Swarm

from biopetals.protocol.messages import (
    Error, Forward, ForwardResult, NodeInfo, NodeInfoRequest, OpenSession, SessionOpened,
)

pytestmark = pytest.mark.timeout(300)


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_metrics_count_sessions_and_error_replies(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False, num_layers=2)
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(ckpt, "0:2", "--no-benchmark", "--metrics-port", "0")
        deadline = time.monotonic() + 10
        while not (m := re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", node.output())):
            assert time.monotonic() < deadline, node.output()
            time.sleep(0.1)
        url = m.group(1)
        before = scrape(url)
        assert before["biopetals_node_sessions_open"] == 0 and before["biopetals_node_queue_depth"] == 0
        assert before["biopetals_node_cache_tokens_left"] > 0
        assert any(k.startswith("biopetals_node_info{") and 'blocks="0:2"' in k for k in before)

        async def talk():
            async with RawClient(swarm.swarm_key) as client:
                info = await client.request(node.addr, NodeInfoRequest())
                assert isinstance(info, NodeInfo)
                out = await client.request(node.addr, Forward(model=info.model, start=0, end=2, codec="f32",
                                                              hidden=torch.randn(2, 3, info.hidden_size)))
                assert isinstance(out, ForwardResult)
                wrong = await client.request(node.addr, OpenSession(model="nope.00000000", start=0, end=2,
                                                                     max_length=8, batch_size=1, codec="f32"))
                assert isinstance(wrong, Error)
                stream, opened = await client.open_session(node.addr, OpenSession(
                    model=info.model, start=0, end=2, max_length=8, batch_size=1, codec="f32"))
                assert isinstance(opened, SessionOpened)
                during = await asyncio.to_thread(scrape, url)
                return during

        during = asyncio.run(talk())
    assert during["biopetals_node_sessions_open"] == 1
    assert before["biopetals_node_tokens_total"] == 0
    assert during["biopetals_node_tokens_total"] == 2 * 3  # the Forward's rows x positions
    assert during['biopetals_node_error_replies_total{code="MODEL_MISMATCH"}'] == 1
