"""Start-up throughput measurement of a node's span, for node info and announcements.

See spec/messages.md §4.2 (``inference_tps``, ``forward_tps``) and
spec/announcement.md §2. Runs on the worker thread before the node goes online;
each measurement stops after ``budget`` seconds so a big span does not delay
start-up for long. ``cached_throughput`` first looks in the throughput cache
(node/throughput_cache.py, node/throughput_store.py): a start with the same facts
(architecture, block count, dtype, quant, device, torch and its threads) reads the
numbers instead of measuring them again, as Petals does; nodes of one machine measure
one at a time, and one that waited reads what the other measured.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from biopetals.models.blocks import BlockSpan
from biopetals.models.config import config_fingerprint
from biopetals.node.backend import set_threads
from biopetals.node.throughput_cache import MeasureFacts, Throughput
from biopetals.node.throughput_store import read_or_measure

if TYPE_CHECKING:
    from biopetals.node.options import NodeOptions

__all__ = ["measure_throughput", "cached_throughput", "span_throughput", "measure_facts", "METHOD"]

#: ``measure_throughput``'s parameters, part of the cache key: change it when the measurement changes.
METHOD = "v2 decode<=32 forward128x3 budget1s, no CPU forward warm-up"


@torch.no_grad()
def measure_throughput(
    span: BlockSpan, *, budget: float = 1.0, decode_steps: int = 32, forward_tokens: int = 128
) -> tuple[float, float]:
    """(inference tokens/s, forward tokens/s) over the whole span.

    Inference: single-sequence decode steps after a one-token prefill, the warm-up
    step excluded. Forward: one sequence of ``forward_tokens`` tokens, stateless, after a
    warm-up call on an accelerator only.
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
    if span.device.type != "cpu":  # a GPU's first call of a shape picks kernels; on a CPU the decode steps
        span.forward(x)  # warmed every layer: one more 128-token forward costs ~1.2 s (1B shape, 4 blocks)
        _sync(span.device)  # for a first run ~6% slower, well inside the run-to-run noise (issue 23 item 5)
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


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU's model name (Linux /proc/cpuinfo, else ``platform``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()
    return device.type


def measure_facts(span: BlockSpan, quant: str) -> MeasureFacts:
    """What ``span``'s measured throughput depends on (call on the thread that measures: torch's
    thread count is per thread)."""
    return MeasureFacts(
        config=config_fingerprint(span.config), blocks=span.n_blocks, max_length=int(span.max_length),
        dtype=str(span.dtype).removeprefix("torch."), quant=quant,
        attention=str(getattr(span.config, "_attn_implementation", None)), device_type=span.device.type,
        device_name=device_name(span.device), cpu_count=os.cpu_count() or 0, torch_version=torch.__version__,
        threads=torch.get_num_threads(), method=METHOD)


def cached_throughput(span: BlockSpan, quant: str, cache: Path | None,
                      measure: Callable[[BlockSpan], tuple[float, float]] = measure_throughput,
                      ) -> tuple[tuple[float, float], bool]:
    """``(throughput, from the cache)``: the cached numbers for ``span`` if ``cache`` (a file path)
    has them, else ``measure(span)``, then stored there (node/throughput_store.py, one node of a
    machine measuring at a time). ``cache`` None: measure, store nothing."""
    if cache is None:
        return measure(span), False
    found, hit = read_or_measure(cache, measure_facts(span, quant), lambda: Throughput(*measure(span)))
    return (found.inference_tps, found.forward_tps), hit


def span_throughput(options: "NodeOptions", span: BlockSpan,
                    measure: Callable[[BlockSpan], tuple[float, float]] = measure_throughput,
                    ) -> tuple[tuple[float, float], bool]:
    """``cached_throughput`` with the node's ``--num-threads``, ``--quant`` and ``--throughput-cache``
    (on the worker thread that measures: torch's thread count is per thread, and part of the key)."""
    set_threads(options.num_threads)
    return cached_throughput(span, options.quant, options.throughput_cache, measure)
