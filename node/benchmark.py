"""Start-up throughput measurement of a node's span, for node info and announcements.

See spec/messages.md §4.2 (``inference_tps``, ``forward_tps``) and
spec/announcement.md §2. Runs on the worker thread before the node goes online;
each measurement stops after ``budget`` seconds so a big span does not delay
start-up for long.
"""

from __future__ import annotations

import time

import torch

from biopetals.models.blocks import BlockSpan

__all__ = ["measure_throughput"]


@torch.no_grad()
def measure_throughput(
    span: BlockSpan, *, budget: float = 1.0, decode_steps: int = 32, forward_tokens: int = 128
) -> tuple[float, float]:
    """(inference tokens/s, forward tokens/s) over the whole span.

    Inference: single-sequence decode steps after a one-token prefill, the warm-up
    step excluded. Forward: one sequence of ``forward_tokens`` tokens, stateless.
    """
    gen = torch.Generator().manual_seed(0)
    hidden_size = span.hidden_size
    steps = max(2, min(decode_steps, span.max_length - 1))
    cache = span.allocate_cache(1, steps + 1)
    x = torch.randn(1, 1, hidden_size, generator=gen)
    span.inference_step(x, cache)  # warm-up, also the prefill
    done, start = 0, time.perf_counter()
    while done < steps - 1:
        span.inference_step(torch.randn(1, 1, hidden_size, generator=gen), cache)
        _sync(span.device)  # a GPU runs kernels asynchronously: time what ran, not what was queued
        done += 1
        if time.perf_counter() - start > budget:
            break
    inference_tps = done / max(time.perf_counter() - start, 1e-9)
    del cache

    tokens = max(1, min(forward_tokens, span.max_length))
    x = torch.randn(1, tokens, hidden_size, generator=gen)
    span.forward(x)  # warm-up
    runs, start = 0, time.perf_counter()
    while True:
        span.forward(x)
        _sync(span.device)
        runs += 1
        if runs >= 3 or time.perf_counter() - start > budget:
            break
    forward_tps = runs * tokens / max(time.perf_counter() - start, 1e-9)
    return float(inference_tps), float(forward_tps)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
