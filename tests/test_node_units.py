"""Sans-IO parts of the node: the KV-cache budget, announcement records, rollback, batching.

The session rules are tested in tests/test_node_session_machine.py."""

from __future__ import annotations

import pytest
import torch

from support_models import make_tiny_checkpoint

from biopetals.models.blocks import BlockSpan
from biopetals.models.step import span_step
from biopetals.node.announcer import AnnouncementInfo, announcement_records
from biopetals.node.backend import Backend
from biopetals.node.budget import CacheBudget
from biopetals.protocol.announcement import State, decode_announcement
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError


def test_budget_per_session_and_total():
    budget = CacheBudget(bytes_per_token=100, total_tokens=1000, session_tokens=400)
    assert budget.tokens_left == 1000
    with pytest.raises(RemoteProtocolError) as info:
        budget.reserve(b"big", 401 * 100, "p")
    assert info.value.code == ErrorCode.CACHE_BUDGET and "per session" in info.value.message
    budget.reserve(b"a", 400 * 100, "p")
    budget.reserve(b"b", 400 * 100, "q")
    assert budget.tokens_left == 200
    with pytest.raises(RemoteProtocolError) as info:
        budget.reserve(b"c", 300 * 100, "r")
    assert info.value.code == ErrorCode.CACHE_BUDGET and "free" in info.value.message
    assert budget.release(b"a") == 40000 and budget.release(b"a") == 0
    budget.reserve(b"c", 300 * 100, "r")
    assert budget.tokens_left == 300 and budget.statistics().sessions == 2


def test_announcement_records_one_per_block():
    info = AnnouncementInfo("tiny.abcd1234", 2, 5, "float32", "none", "biopetals/0.1.0", ("/ip4/127.0.0.1/tcp/1",))
    records = announcement_records(info, State.ONLINE, (10.0, 100.0), 77)
    assert [k for k, _ in records] == ["tiny.abcd1234.2", "tiny.abcd1234.3", "tiny.abcd1234.4"]
    ann = decode_announcement(records[0][1])
    assert (ann.state, ann.start, ann.end, ann.cache_tokens_left) == (State.ONLINE, 2, 5, 77)


def test_failed_step_leaves_the_cache_as_it_was(tmp_path):
    """spec/messages.md §2.6: a step whose result is not finite in the session's codec changes nothing."""
    span = BlockSpan.load(make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False, num_layers=2), 0, 2)
    backend = Backend(span)
    try:
        cache = span.allocate_cache(1, 8)
        x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
        first = backend.step(span, cache, span_step(x[:, :2], cache.length), "f32")
        with pytest.raises(RemoteProtocolError) as info:
            backend.step(span, cache, span_step(torch.full((1, 1, 64), 1e30), cache.length), "f16")  # overflows fp16
        assert info.value.code == ErrorCode.NON_FINITE
        assert cache.length == 2
        again = backend.step(span, cache, span_step(x[:, 2:], cache.length), "f32")
        fresh = span.allocate_cache(1, 8)
        with torch.no_grad():
            ref = span.inference_step(x, fresh)
        assert torch.allclose(torch.cat([first, again], 1), ref, atol=1e-6)
    finally:
        backend.shutdown()


def test_queued_decode_steps_batch_and_fail_alone(tmp_path):
    """node/backend.py batching: decode steps queued behind a busy worker run as one call,
    equal to running each session alone; a non-finite row or an overflowing cache fails
    only its own session and leaves its cache as it was."""
    import asyncio
    import threading

    span = BlockSpan.load(make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False, num_layers=2), 0, 2)
    backend = Backend(span)
    gen = torch.Generator().manual_seed(0)
    prefix = [torch.randn(1, n, 64, generator=gen) for n in (2, 5, 3, 7)]
    caches = [span.allocate_cache(1, 8) for _ in prefix]
    refs = [span.allocate_cache(1, 8) for _ in prefix]
    for x, c, r in zip(prefix, caches, refs):
        backend.step(span, c, span_step(x, c.length), "f32")
        backend.step(span, r, span_step(x, r.length), "f32")

    async def round_(hiddens, codecs):
        gate = threading.Event()
        busy = asyncio.ensure_future(backend.run(gate.wait))
        await asyncio.sleep(0.05)  # the worker is now blocked: the steps below queue up
        steps = [asyncio.ensure_future(backend.run_step(span, c, span_step(h, c.length), k)) for c, h, k in zip(caches, hiddens, codecs)]
        await asyncio.sleep(0.05)
        gate.set()
        await busy
        return await asyncio.gather(*steps, return_exceptions=True)

    try:
        new = [torch.randn(1, 1, 64, generator=gen) for _ in prefix]
        new[1] = torch.full((1, 1, 64), 1e30)  # overflows f16: only session 1 fails
        outs = asyncio.run(round_(new, ["f32", "f16", "f32", "f32"]))
        assert backend.stats.batched_calls == 1 and backend.stats.largest_batch == 4
        assert isinstance(outs[1], RemoteProtocolError) and outs[1].code == ErrorCode.NON_FINITE
        assert [c.length for c in caches] == [3, 5, 4, 8]
        for i in (0, 2, 3):
            alone = backend.step(span, refs[i], span_step(new[i], refs[i].length), "f32")
            assert (outs[i] - alone).abs().max().item() <= 1e-5

        # session 3 is full: the batched call is refused, the steps rerun one by one
        new = [torch.randn(1, 1, 64, generator=gen) for _ in prefix]
        outs = asyncio.run(round_(new, ["f32"] * 4))
        assert backend.stats.fallbacks == 1
        assert not isinstance(outs[0], BaseException) and isinstance(outs[3], Exception)
        assert [c.length for c in caches] == [4, 6, 5, 8]
        for i in (0, 2):
            alone = backend.step(span, refs[i], span_step(new[i], refs[i].length), "f32")
            assert (outs[i] - alone).abs().max().item() <= 1e-5
    finally:
        backend.shutdown()
