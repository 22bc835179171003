"""The node backend's KV-cache rollback (node/backend.py, spec/messages.md §5.6.1) on a real tiny span.

A ``truncate`` step reaches the backend as a ``SpanStep`` whose position is below the cache's
length: the backend cuts the cache to it, and the outputs then equal those of a cache that never
held the cut columns. If the step fails (here an fp16 overflow, ``NON_FINITE``), the cache is
exactly as before the step, the overwritten columns included (§2.6). In-process, no sockets.
"""

from __future__ import annotations

import pytest
import torch
from support_models import make_tiny_checkpoint

from biopetals.models.blocks import BlockSpan
from biopetals.models.step import span_step
from biopetals.node.backend import Backend
from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.tensors import Codec


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("rollback") / "tiny", num_layers=2)
    b = Backend(BlockSpan.load(path, 0, 2))
    yield b
    b.shutdown()


def x(tokens: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    return torch.randn(1, tokens, 64, generator=torch.Generator().manual_seed(seed)) * scale


def test_a_truncate_step_equals_a_cache_that_never_held_the_cut_columns(backend):
    span = backend.span
    rolled, fresh = span.allocate_cache(1, 16), span.allocate_cache(1, 16)
    backend.step(span, rolled, span_step(x(5, 1), 0), Codec.F32)
    out = backend.step(span, rolled, span_step(x(3, 2), 2), Codec.F32)  # cut columns 2-4, then 3 new
    assert rolled.length == 5
    backend.step(span, fresh, span_step(x(5, 1)[:, :2], 0), Codec.F32)
    want = backend.step(span, fresh, span_step(x(3, 2), 2), Codec.F32)
    assert torch.allclose(out, want, atol=1e-5)
    # and the next step sees the same cache in both
    assert torch.allclose(backend.step(span, rolled, span_step(x(1, 3), 5), Codec.F32),
                          backend.step(span, fresh, span_step(x(1, 3), 5), Codec.F32), atol=1e-5)


def test_a_failed_truncate_step_leaves_the_cache_as_it_was(backend):
    span = backend.span
    cache = span.allocate_cache(1, 16)
    backend.step(span, cache, span_step(x(6, 4), 0), Codec.F32)
    before = [(layer.keys[:, :, :6].clone(), layer.values[:, :, :6].clone()) for layer in cache.cache.layers]
    with pytest.raises(RemoteProtocolError, match="NaN or infinity"):  # overflows fp16 on the wire
        backend.step(span, cache, span_step(x(3, 5, scale=1e6), 2), Codec.F16)
    assert cache.length == 6
    for layer, (keys, values) in zip(cache.cache.layers, before):
        assert torch.equal(layer.keys[:, :, :6], keys) and torch.equal(layer.values[:, :, :6], values)
