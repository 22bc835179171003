"""A long session step (a prefill) in column chunks over the session's own KV cache (node/slices.py, node/backend.py).

The plan: every chunk holds all rows and at most ``slice_tokens // batch`` columns; the mask
and the deep prompts are cut by the chunk's columns. The run, on a real tiny span in process
(no sockets): a chunked step gives the unchunked step's outputs and leaves the same cache (the
next decode step agrees), with a left-padded batch, deep prompts and a ``truncate`` step; it is
atomic (spec/messages.md §2.6, §5.6.1): a chunk that fails (an fp16 overflow, ``NON_FINITE``),
a session closed between chunks, or a task cancelled between chunks leaves the cache exactly as
it was, overwritten columns included; another peer's job runs between two chunks. Greedy tokens
through a real swarm with chunked prefills: tests/test_client_long_context.py (8300-token
prompt, default ``--compute-slice-tokens`` 512); latency under a long prefill:
benchmarks/bench_hostile.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from support_models import make_tiny_checkpoint

from biopetals.models.blocks import BlockSpan
from biopetals.models.step import span_step
from biopetals.node.backend import Backend
from biopetals.node.fair_queue import current_peer
from biopetals.node.slices import Slice, plan_step_chunks, step_chunk
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.tensors import Codec

TOL = 1e-5


def test_chunks_hold_every_row_and_at_most_the_bound() -> None:
    assert plan_step_chunks(1, 512, 512) == [Slice(0, 1, 0, 512)]  # within the bound: one chunk, as before
    assert plan_step_chunks(2, 100, 64) == [Slice(0, 2, 0, 32), Slice(0, 2, 32, 64), Slice(0, 2, 64, 96),
                                            Slice(0, 2, 96, 100)]
    assert plan_step_chunks(1, 4096, 512) == [Slice(0, 1, c, c + 512) for c in range(0, 4096, 512)]
    assert plan_step_chunks(600, 3, 512) == [Slice(0, 600, c, c + 1) for c in range(3)]  # wider than the bound
    for batch, tokens, bound in ((3, 1000, 100), (7, 77, 20), (1, 5000, 512)):
        chunks = plan_step_chunks(batch, tokens, bound)
        assert all(c.cost <= bound and (c.row0, c.row1) == (0, batch) for c in chunks)
        assert [c.col0 for c in chunks[1:]] == [c.col1 for c in chunks[:-1]] and chunks[-1].col1 == tokens
    for bad in ((0, 5, 8), (1, 0, 8), (1, 5, 0)):
        with pytest.raises(ValueError):
            plan_step_chunks(*bad)


def test_a_chunk_gets_its_columns_of_the_mask_positions_and_prompts() -> None:
    gen = torch.Generator().manual_seed(1)
    hidden, prompts = torch.randn(2, 7, 4, generator=gen), torch.randn(3, 1, 5, 4, generator=gen)
    past = torch.tensor([[True] * 4, [False, False, True, True]])
    step = span_step(hidden, 4, past_mask=past, prompts=prompts)
    parts = [step_chunk(step, c) for c in plan_step_chunks(2, 7, 6)]  # columns [0,3) [3,6) [6,7)
    assert [p.position for p in parts] == [4, 7, 10]
    assert [p.mask.shape[1] for p in parts] == [7, 10, 11] and torch.equal(parts[-1].mask, step.mask)
    assert torch.equal(torch.cat([p.positions for p in parts], 1), step.positions)
    assert torch.equal(torch.cat([p.hidden for p in parts], 1), hidden)
    assert torch.equal(parts[0].prompts, prompts[:, :, :3]) and torch.equal(parts[1].prompts, prompts[:, :, 3:5])
    assert parts[2].prompts is None  # past the prompts' 5 positions
    with pytest.raises(ValueError):
        step_chunk(step, Slice(0, 1, 0, 3))  # a chunk holds every row


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    return BlockSpan.load(make_tiny_checkpoint(tmp_path_factory.mktemp("chunks") / "tiny", num_layers=2), 0, 2)


def x(batch: int, tokens: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(batch, tokens, 64, generator=torch.Generator().manual_seed(seed)) * scale


def _run(coro, peer: str = "peer"):
    async def go():
        current_peer.set(peer)
        return await coro

    return asyncio.run(go())


def _kv(cache, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone()) for layer in cache.cache.layers]


def _same_kv(cache, saved) -> bool:
    length = saved[0][0].shape[2]
    return all(torch.equal(k, a) and torch.equal(v, b) for (k, v), (a, b) in zip(_kv(cache, length), saved))


def test_a_chunked_step_equals_the_whole_step_with_padding_prompts_and_truncate(span) -> None:
    """Batch of 2 (left padding longer than a chunk), prompts over 2.5 chunks, a 40-token step cut in 5 chunks of
    8 columns, then a truncate step of 30 tokens cut in 4: outputs and the cache (the next decode step) agree."""
    whole, chunked = Backend(span), Backend(span, slice_tokens=16)
    try:
        caches = [span.allocate_cache(2, 96) for _ in range(2)]
        new_mask = torch.ones(2, 40, dtype=torch.bool)
        new_mask[1, :11] = False
        prompts = torch.randn(2, 2, 20, 64, generator=torch.Generator().manual_seed(5)) * 0.1
        first = span_step(x(2, 40, 1), 0, new_mask=new_mask, prompts=prompts)
        second = span_step(x(2, 30, 2), 25, past_mask=new_mask[:, :25])  # cuts columns 25..39 (§5.6.1)
        decode = span_step(x(2, 1, 3), 55, past_mask=torch.cat([new_mask[:, :25], torch.ones(2, 30, dtype=torch.bool)], 1))
        outs, chunks = [], []
        for backend, cache in zip((whole, chunked), caches):
            outs.append([_run(backend.run_step(span, cache, s, Codec.F32, alive=lambda: chunks.append(1) or True))
                         for s in (first, second, decode)])
            assert cache.length == 56
        assert len(chunks) == 5 + 4  # alive() is asked before each chunk; the whole steps and the decode step: never
        assert chunked.stats.tokens == 2 * (40 + 30 + 1) and chunked.stats.batched_calls == 0
        real = torch.cat([new_mask[:, :25], torch.ones(2, 31, dtype=torch.bool)], 1).unsqueeze(-1)
        for got, want, cols in zip(outs[1], outs[0], (slice(0, 40), slice(25, 55), slice(55, 56))):
            assert got.shape == want.shape
            assert ((got - want).abs() * real[:, cols]).max().item() <= TOL
    finally:
        whole.shutdown()
        chunked.shutdown()


def test_a_chunk_that_fails_leaves_the_cache_as_it_was(span) -> None:
    """Chunk 3 of 4 overflows fp16 on the wire (NON_FINITE): the cache is back to its 12 columns, then a truncate
    step failing the same way puts back the columns it overwrote; the session goes on as if nothing ran."""
    backend, fresh = Backend(span, slice_tokens=8), Backend(span)
    try:
        cache, ref = span.allocate_cache(1, 64), span.allocate_cache(1, 64)
        for b, c in ((backend, cache), (fresh, ref)):
            _run(b.run_step(span, c, span_step(x(1, 12, 1), 0), Codec.F32))
        saved = _kv(cache, 12)
        bad = x(1, 30, 2)
        bad[:, 20:] *= 1e6  # columns 16..23 are chunk 3
        for position in (12, 4):  # appending, then truncating at column 4
            chunks = []
            with pytest.raises(RemoteProtocolError) as info:
                _run(backend.run_step(span, cache, span_step(bad, position), Codec.F16,
                                      alive=lambda: chunks.append(cache.length) or True))
            assert info.value.code == ErrorCode.NON_FINITE and chunks == [position, position + 8, position + 16]
            assert cache.length == 12 and cache.padding_mask is None and _same_kv(cache, saved)
        nxt = [_run(b.run_step(span, c, span_step(x(1, 20, 3), 12), Codec.F32)) for b, c in ((backend, cache), (fresh, ref))]
        assert (nxt[0] - nxt[1]).abs().max().item() <= TOL
    finally:
        backend.shutdown()
        fresh.shutdown()


def test_a_session_closed_or_cancelled_between_chunks_is_rolled_back(span) -> None:
    backend = Backend(span, slice_tokens=8)
    try:
        cache = span.allocate_cache(1, 64)
        _run(backend.run_step(span, cache, span_step(x(1, 10, 1), 0), Codec.F32))
        saved = _kv(cache, 10)
        calls = []

        def closes_after_two() -> bool:
            calls.append(cache.length)
            return len(calls) <= 2

        with pytest.raises(RemoteProtocolError) as info:  # closed: the third chunk never runs
            _run(backend.run_step(span, cache, span_step(x(1, 40, 2), 4), Codec.F32, alive=closes_after_two))
        assert info.value.code == ErrorCode.UNKNOWN_SESSION and calls == [4, 12, 20]
        assert cache.length == 10 and _same_kv(cache, saved)

        async def cancelled_after_one() -> None:
            task = asyncio.current_task()

            def alive() -> bool:
                if cache.length > 10:
                    task.cancel()
                return True

            await backend.run_step(span, cache, span_step(x(1, 40, 3), 10), Codec.F32, alive=alive)

        with pytest.raises(asyncio.CancelledError):
            _run(cancelled_after_one())
        assert cache.length == 10 and _same_kv(cache, saved)
    finally:
        backend.shutdown()


def test_another_peers_job_runs_between_two_chunks(span) -> None:
    """The worker is held by a third peer's job while a 32-token prefill (4 chunks) and another peer's job queue:
    that job runs after the prefill's first chunk, not after its last."""
    backend = Backend(span, slice_tokens=8)
    started, gate, seen = threading.Event(), threading.Event(), []
    cache = span.allocate_cache(1, 64)

    async def as_peer(peer, coro):
        current_peer.set(peer)
        return await coro

    async def go():
        held = asyncio.create_task(as_peer("c", backend.run(lambda: (started.set(), gate.wait(10)))))
        while not started.is_set():
            await asyncio.sleep(0.001)
        prefill = asyncio.create_task(as_peer("a", backend.run_step(span, cache, span_step(x(1, 32, 1), 0), Codec.F32)))
        await asyncio.sleep(0.01)
        other = asyncio.create_task(as_peer("b", backend.run(lambda: seen.append(cache.length))))
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(held, prefill, other)

    try:
        asyncio.run(go())
    finally:
        backend.shutdown()
    assert cache.length == 32 and 0 < seen[0] < 32
