"""``--quant int8|nf4`` through bitsandbytes on CPU: correctness on the tiny model, not speed.

int8 runs in a real node process; nf4 in-process (same code path: node/quant.py on a
``BlockSpan``). Bounds are loose on purpose: quantisation error on random weights,
measured against the unquantised span, and reported.
"""

from __future__ import annotations

import asyncio
import importlib.util

import pytest
import torch

from support_models import make_tiny_checkpoint
from support_swarm import RawClient, Swarm

from biopetals.models.blocks import BlockSpan
from biopetals.models.config import model_info
from biopetals.node.quant import QuantError, quantize_span
from biopetals.protocol.messages import Forward, ForwardResult, NodeInfo, NodeInfoRequest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("q") / "tiny", with_tokenizer=False)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_nf4_in_process(checkpoint, capsys):
    ref = BlockSpan.load(checkpoint, 0, 4)
    q = BlockSpan.load(checkpoint, 0, 4)
    assert quantize_span(q, "nf4") == 4 * 7  # q, k, v, o, gate, up, down per block
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref.forward(x), q.forward(x)
        cache = q.allocate_cache(1, 6)
        steps = torch.cat([q.inference_step(x[:, :5], cache), q.inference_step(x[:, 5:], cache)], 1)
    with capsys.disabled():
        print(f"\nnf4 vs fp32 blocks 0:4: max relative diff {_relative(got, want):.3f}")
    assert _relative(got, want) < 0.2
    assert (steps - got).abs().max().item() < 1e-4  # the KV cache path agrees with the stateless one


def test_unknown_mode_is_refused(checkpoint):
    with pytest.raises(QuantError):
        quantize_span(BlockSpan.load(checkpoint, 0, 1), "int3")


def test_int8_node(tmp_path, checkpoint, capsys):
    model = model_info(checkpoint).dht_prefix
    ref = BlockSpan.load(checkpoint, 0, 4)
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.forward(x)
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(checkpoint, "0:4", "--quant", "int8")

        async def go():
            async with RawClient(swarm.swarm_key) as client:
                info = await client.request(node.addr, NodeInfoRequest())
                out = await client.request(node.addr, Forward(model=model, start=0, end=4, codec="f32", hidden=x), "f32")
                return info, out

        info, out = asyncio.run(go())
    assert isinstance(info, NodeInfo) and info.quant == "int8"
    assert isinstance(out, ForwardResult)
    with capsys.disabled():
        print(f"\nint8 node vs fp32 blocks 0:4: max relative diff {_relative(out.hidden, want):.4f}")
    assert _relative(out.hidden, want) < 0.05
