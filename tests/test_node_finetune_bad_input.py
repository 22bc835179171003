"""Bad fine-tuning requests sent to a real node process: typed errors, and the node keeps serving.

spec/messages.md §6.1-§6.2 cross-field rules: a ``Backward`` whose ``grad_outputs`` has
another shape than ``hidden``, ``prompts`` longer than the sequence, for another number
of blocks or another batch: ``INVALID_TENSOR``. The bytes are built by hand (our message
constructors refuse such messages locally). After them, a valid ``Backward`` with
prompts returns gradients of the right shapes.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import torch
from support_models import make_tiny_checkpoint
from support_swarm import RawClient, Swarm

from biopetals.models.config import model_info
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import Backward, BackwardResult, Error
from biopetals.protocol.tensors import encode_tensor

HIDDEN = 64


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    ckpt = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_tokenizer=False)
    with Swarm(tmp_path_factory.mktemp("swarm")) as swarm:
        yield swarm, swarm.start_node(ckpt, "0:4"), model_info(ckpt).dht_prefix


def t(*shape):
    return encode_tensor(torch.full(shape, 0.25), "f32")


def backward(model, hidden, grad, prompts=None) -> bytes:
    body = {0: model, 1: 0, 2: 4, 3: "f32", 4: hidden, 5: grad}
    if prompts is not None:
        body[6] = prompts
    return msgpack.packb({0: 1, 1: 13, 2: body}, use_bin_type=True)


def forward(model, hidden, prompts) -> bytes:
    return msgpack.packb({0: 1, 1: 11, 2: {0: model, 1: 0, 2: 4, 3: "f32", 4: hidden, 5: prompts}}, use_bin_type=True)


def test_bad_backward_and_prompts_are_typed_errors(node):
    swarm, n, model = node

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            for data in (
                backward(model, t(2, 5, HIDDEN), t(2, 4, HIDDEN)),  # grad_outputs of the wrong shape
                backward(model, t(2, 5, HIDDEN), t(1, 5, HIDDEN)),
                backward(model, t(2, 5, HIDDEN), t(2, 5, HIDDEN), t(4, 2, 6, HIDDEN)),  # prompts longer than 5 tokens
                forward(model, t(2, 5, HIDDEN), t(4, 2, 6, HIDDEN)),
                forward(model, t(2, 5, HIDDEN), t(3, 2, 2, HIDDEN)),  # 3 blocks of prompts for a 4-block span
                forward(model, t(2, 5, HIDDEN), t(4, 1, 2, HIDDEN)),  # batch 1 for a batch of 2
            ):
                reply = await client.request_bytes(n.addr, data)
                assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_TENSOR, reply
            ok = await client.request(n.addr, Backward(
                model=model, start=0, end=4, codec="f32", hidden=torch.randn(2, 5, HIDDEN),
                grad_outputs=torch.randn(2, 5, HIDDEN), prompts=torch.randn(4, 2, 3, HIDDEN)), "f32")
            assert isinstance(ok, BackwardResult), ok
            assert ok.grad_inputs.shape == (2, 5, HIDDEN) and ok.grad_prompts.shape == (4, 2, 3, HIDDEN)
            assert ok.grad_prompts.abs().max() > 0

    asyncio.run(go())
    assert n.alive()
