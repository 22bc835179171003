"""Large Forwards/Backwards computed in slices (node/slices.py, node/backend.py): the plan, and exactness.

A sliced request must give the unsplit computation's result: checked against transformers'
own model on the same checkpoint (fp32), with a left-padded batch, and against the node's
unsplit computation with deep prompts (shared by the rows, and one per row). The fair order
of the slices (other peers' jobs between them) is node/fair_queue.py's, tested in
tests/test_node_fair_queue.py; the latency it buys is measured by benchmarks/bench_hostile.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from support_models import tiny_llama_checkpoint  # noqa: F401 (a fixture)

from biopetals.models.blocks import BlockSpan
from biopetals.node.backend import Backend
from biopetals.node.budget import CacheBudget
from biopetals.node.fair_queue import current_peer
from biopetals.node.slices import Slice, plan_slices
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

TOL = 1e-5
SPAN = (0, 3)


def test_rows_are_grouped_up_to_the_slice_size() -> None:
    assert plan_slices(32, 256, 512) == [Slice(r, r + 2, 0, 256) for r in range(0, 32, 2)]
    assert plan_slices(5, 100, 512) == [Slice(0, 5, 0, 100)]  # small: one slice, as before
    assert plan_slices(3, 1000, 512, by_columns=False) == [Slice(r, r + 1, 0, 1000) for r in range(3)]
    assert all(s.cost <= 512 for s in plan_slices(7, 100, 512)) and plan_slices(7, 100, 512)[-1] == Slice(5, 7, 0, 100)


def test_long_rows_are_cut_into_column_chunks_with_the_prompts_in_the_first() -> None:
    assert plan_slices(2, 1200, 512) == [
        Slice(0, 1, 0, 512), Slice(0, 1, 512, 1024), Slice(0, 1, 1024, 1200),
        Slice(1, 2, 0, 512), Slice(1, 2, 512, 1024), Slice(1, 2, 1024, 1200),
    ]
    assert plan_slices(1, 1200, 512, first_columns=600) == [Slice(0, 1, 0, 600), Slice(0, 1, 600, 1112), Slice(0, 1, 1112, 1200)]
    for bad in ((0, 5, 512), (1, 0, 512), (1, 5, 0)):
        with pytest.raises(ValueError):
            plan_slices(*bad)
    with pytest.raises(ValueError):
        plan_slices(1, 5, 512, first_columns=6)


@pytest.fixture(scope="module")
def setup(tiny_llama_checkpoint):
    span = BlockSpan.load(tiny_llama_checkpoint, *SPAN)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_checkpoint, dtype=torch.float32).eval()
    return span, model


def _run(coro):
    async def go():
        current_peer.set("peer")
        return await coro

    return asyncio.run(go())


def test_sliced_forward_and_backward_match_transformers(setup) -> None:
    """A left-padded batch of 5 rows, slices of 2 rows: outputs and input gradients as transformers'."""
    span, model = setup
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 9, 64, generator=gen)
    grad_out = torch.randn(5, 9, 64, generator=gen)
    mask = torch.ones(5, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[4, :1] = 0
    x_ref = x.clone().requires_grad_(True)
    ref = model(inputs_embeds=x_ref, attention_mask=mask, output_hidden_states=True).hidden_states[SPAN[1]]
    (ref * grad_out).sum().backward()
    real = mask.bool().unsqueeze(-1)  # padded positions are nobody's output (§8.1)

    backend = Backend(span, slice_tokens=18)
    try:
        assert len(plan_slices(5, 9, backend.slice_tokens)) == 3
        out = _run(backend.run_forward(span, x, None, "f32", mask))
        grad_x, none = _run(backend.run_backward(span, x, grad_out, None, "f32", mask))
    finally:
        backend.shutdown()
    assert none is None and out.shape == x.shape
    assert ((out - ref.detach()).abs() * real).max().item() <= TOL
    assert ((grad_x - x_ref.grad).abs() * real).max().item() <= TOL


@pytest.mark.parametrize("prompt_rows", [1, 4])
def test_sliced_backward_with_deep_prompts_matches_the_unsplit_one(setup, prompt_rows) -> None:
    """Prompts shared by every row (their gradient summed over the slices) or one per row (concatenated)."""
    span, _ = setup
    gen = torch.Generator().manual_seed(prompt_rows)
    x = torch.randn(4, 6, 64, generator=gen)
    grad_out = torch.randn(4, 6, 64, generator=gen)
    prompts = torch.randn(span.n_blocks, prompt_rows, 2, 64, generator=gen) * 0.1
    whole = Backend(span)
    sliced = Backend(span, slice_tokens=6)
    try:
        expected = _run(whole.run_forward(span, x, prompts, "f32"))
        grads = _run(whole.run_backward(span, x, grad_out, prompts, "f32"))
        assert len(plan_slices(4, 6, sliced.slice_tokens)) == 4
        out = _run(sliced.run_forward(span, x, prompts, "f32"))
        grad_x, grad_p = _run(sliced.run_backward(span, x, grad_out, prompts, "f32"))
    finally:
        whole.shutdown()
        sliced.shutdown()
    assert (out - expected).abs().max().item() <= TOL
    assert (grad_x - grads[0]).abs().max().item() <= TOL
    assert grad_p.shape == prompts.shape and (grad_p - grads[1]).abs().max().item() <= TOL


def test_long_rows_run_in_column_chunks_over_a_reserved_cache_as_transformers(setup) -> None:
    """Rows of 40 tokens, slices of 16: three chunks a row over a KV cache of the row, reserved in the
    budget for the peer and released after; a left padding (25) longer than a chunk; as transformers."""
    span, model = setup
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 40, 64, generator=gen)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :25] = 0
    ref = model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True).hidden_states[SPAN[1]].detach()
    real = mask.bool().unsqueeze(-1)
    backend = Backend(span, slice_tokens=16)
    budget = CacheBudget(span.cache_bytes_per_token(), total_tokens=100, session_tokens=10)  # per-session: not applied
    try:
        assert len(plan_slices(2, 40, backend.slice_tokens)) == 6
        out = _run(backend.run_forward(span, x, None, "f32", mask, budget=budget))
        assert budget.reserved_bytes == 0 and backend.stats.tokens == 80
        assert ((out - ref).abs() * real).max().item() <= TOL
        # a peer's share of 60 tokens is 30 (its one session of 20 fits in it): a 40-token row's cache does not
        with pytest.raises(RemoteProtocolError) as info:  # the row's cache does not fit: BUSY, nothing held
            _run(backend.run_forward(span, x, None, "f32", mask, budget=CacheBudget(span.cache_bytes_per_token(), 60, 20)))
        assert info.value.code == ErrorCode.BUSY and "one peer may hold" in info.value.message
    finally:
        backend.shutdown()


def test_chunked_forward_with_deep_prompts_matches_the_unsplit_one(setup) -> None:
    """Prompts of 20 positions: the first chunk of each row is 20 columns, not 16."""
    span, _ = setup
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 40, 64, generator=gen)
    prompts = torch.randn(span.n_blocks, 2, 20, 64, generator=gen) * 0.1
    whole, sliced = Backend(span), Backend(span, slice_tokens=16)
    try:
        expected = _run(whole.run_forward(span, x, prompts, "f32"))
        out = _run(sliced.run_forward(span, x, prompts, "f32", budget=CacheBudget(span.cache_bytes_per_token(), 1000)))
    finally:
        whole.shutdown()
        sliced.shutdown()
    assert (out - expected).abs().max().item() <= TOL
