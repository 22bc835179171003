"""The compute side of a node: its ``BlockSpan``, one worker thread, and the tensor work.

Every computation runs on one worker thread per device (a single-thread executor),
off the asyncio event loop; torch releases the GIL while it computes, so the loop
keeps serving the network meanwhile. Jobs wait in a fair queue by peer (node/fair_queue.py), and each
session has at most one step in flight (node/session_machine.py), so sessions progress
round-robin. Steps arrive as ``models.step.SpanStep`` values the session state machine
checked; this module computes them and checks only that the results are finite.

Batching (opportunistic, ``Backend.run_step``): a decode step (one token per row, no
step mask, no prompts) is queued like any job; when the worker reaches it, every
other session's decode step for the same span already waiting is taken along and
all run as one call (``models.blocks.batched_decode_step``), reading the weights
once instead of once per session. Nothing ever waits for company: a lone session
runs exactly as before. If the batched call fails, the caches are rolled back and
the steps run one by one, so one bad step fails only its own session. Measured on
2 CPU cores (SmolLM2-135M, 30 blocks, fp32): 8 sessions take 92 ms batched instead
of 434 ms one by one. Only steps with the same server-side adapter (spec/messages.md §6.3)
share a batched call, run under that adapter (``AdapterSet.use``). A large Forward or
Backward runs as slices of at most ``slice_tokens`` tokens (node/slices.py: whole rows, or
column chunks of a long Forward row over a KV cache reserved for the peer), and a session
step over that bound (a long prefill) as column chunks appended to the session's own cache,
rolled back as a whole if any chunk fails; each slice or chunk is queued fairly on its own,
so other peers' steps run between them (issue 21). See spec/messages.md §5 and §6.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch

from biopetals.models.blocks import BlockSpan, SpanCache, batched_decode_step, kv_cache_bytes
from biopetals.models.step import SpanStep
from biopetals.node.adapters import AdapterSet
from biopetals.node.budget import CacheBudget
from biopetals.node.fair_queue import MAX_QUEUE_PER_PEER, FairQueue, current_peer
from biopetals.node.slices import SLICE_TOKENS, Slice, plan_slices, plan_step_chunks, step_chunk
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.tensors import Codec

__all__ = ["Backend", "BatchStats", "WIRE_DTYPE", "set_threads"]

T = TypeVar("T")

#: The dtype each codec carries: results are converted to it before the finiteness
#: check, so an fp16 overflow is caught here (spec/messages.md §7.3).
WIRE_DTYPE = {Codec.F32: torch.float32, Codec.BF16: torch.bfloat16, Codec.F16: torch.float16, Codec.F16_ZSTD: torch.float16}


def _finite_on_wire(tensor: torch.Tensor, codec: Codec, what: str) -> torch.Tensor:
    wire = tensor.detach().to(device="cpu", dtype=WIRE_DTYPE[Codec(codec)])
    if not bool(torch.isfinite(wire).all()):
        raise RemoteProtocolError(
            ErrorCode.NON_FINITE, f"the node computed NaN or infinity in {what} (as {Codec(codec).value})"
        )
    return wire


def set_threads(num_threads: int) -> None:
    """Use ``num_threads`` intra-op threads in the calling thread (0: leave torch's default).

    Called in every thread that computes: OpenMP keeps the team size per thread.
    """
    if num_threads > 0 and torch.get_num_threads() != num_threads:
        torch.set_num_threads(num_threads)


@dataclass
class BatchStats:
    """Counters of the decode steps run (read on the event loop, written by the worker)."""

    decode_steps: int = 0  # decode steps run through ``run_step``'s batchable path
    batched_steps: int = 0  # of which run inside a batched call of 2 or more sessions
    batched_calls: int = 0
    largest_batch: int = 0
    fallbacks: int = 0  # batched calls that failed and were rerun one by one
    #: tokens (rows x columns) computed by finished steps, Forwards and Backwards (the metrics' tokens_total)
    tokens: int = 0

    def line(self) -> str:
        return (
            f"decode steps: {self.decode_steps}, batched: {self.batched_steps} in {self.batched_calls} calls "
            f"(largest {self.largest_batch}), fallbacks: {self.fallbacks}"
        )


@dataclass(eq=False)
class _Decode:
    """A batchable decode step waiting for the worker."""

    view: BlockSpan
    cache: SpanCache
    step: SpanStep
    codec: Codec
    adapter: str | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    taken: bool = False


class Backend:
    """Blocks ``[span.start, span.end)`` and the single worker that runs them."""

    def __init__(
        self, span: BlockSpan, *, max_queue: int = 1024, num_threads: int = 0, max_batch: int = 64,
        adapters: AdapterSet | None = None, max_queue_per_peer: int = MAX_QUEUE_PER_PEER,
        slice_tokens: int = SLICE_TOKENS,
    ) -> None:
        self.span = span
        self.adapters = adapters if adapters is not None else AdapterSet()
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.slice_tokens = slice_tokens
        self.stats = BatchStats()
        self._waiting: list[_Decode] = []  # batchable steps not yet taken, FIFO
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="biopetals-compute", initializer=set_threads, initargs=(num_threads,)
        )
        self._queued = 0
        self._views: dict[tuple[int, int], BlockSpan] = {}
        # Jobs wait here, by peer, and the worker takes them in fair order (node/fair_queue.py).
        self._fair: FairQueue[tuple[concurrent.futures.Future[Any], Callable[[], None]]] = FairQueue(
            max_per_peer=max_queue_per_peer
        )

    @property
    def queued(self) -> int:
        return self._queued

    def view(self, start: int, end: int) -> BlockSpan:
        """The sub-span ``[start, end)`` sharing the weights (cached)."""
        if (start, end) == (self.span.start, self.span.end):
            return self.span
        key = (start, end)
        if key not in self._views:
            self._views[key] = self.span.sub(start, end)
        return self._views[key]

    def cache_bytes(self, start: int, end: int, batch_size: int, max_length: int) -> int:
        return kv_cache_bytes(self.span.config, end - start, self.span.dtype, batch_size, max_length)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker thread, peers served fairly (node/fair_queue.py); ``BUSY`` when full."""
        self._check_room()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._submit(future, lambda: _run_into(future, fn, args), _cost(args))
        self._queued += 1
        try:
            return await asyncio.wrap_future(future)
        finally:
            self._queued -= 1

    async def run_forward(
        self, view: BlockSpan, hidden: torch.Tensor, prompts: torch.Tensor | None, codec: Codec,
        mask: torch.Tensor | None = None, adapter: str | None = None, budget: CacheBudget | None = None,
    ) -> torch.Tensor:
        """A ``Forward``'s computation in slices (node/slices.py), each queued fairly on its own, so that
        other peers' jobs run between two slices. With ``budget``, a row longer than a slice runs in
        column chunks over a KV cache of that row, reserved in ``budget`` for the peer like a session's
        cache (``BUSY`` when it does not fit); without, it runs whole."""
        batch, tokens = hidden.shape[:2]
        first = prompts.shape[2] if prompts is not None else 0
        slices = plan_slices(batch, tokens, self.slice_tokens, by_columns=budget is not None, first_columns=first)
        if len(slices) == 1:
            return await self.run(self.forward, view, hidden, prompts, codec, mask, adapter)
        out = torch.empty(hidden.shape, dtype=WIRE_DTYPE[Codec(codec)])
        owner = os.urandom(16) if slices[0].col1 < tokens else None  # long rows: one row's cache at a time
        if owner is not None and budget is not None:
            try:
                budget.reserve(owner, self.cache_bytes(view.start, view.end, 1, tokens), current_peer.get(),
                               per_session=False)
            except RemoteProtocolError as exc:
                raise RemoteProtocolError(
                    ErrorCode.BUSY, f"a row of {tokens} tokens runs in chunks over a KV cache: {exc.message}; retry later"
                ) from None
        try:
            cache = None
            for s in slices:
                rows, cols = slice(s.row0, s.row1), slice(s.col0, s.col1)
                row_mask = _rows(mask, rows, batch)
                if s.col0 == 0 and s.col1 < tokens:
                    cache = await self.run(view.allocate_cache, s.row1 - s.row0, tokens)
                out[rows, cols] = await self.run(  # a whole-rows slice has no cache (None)
                    self.forward, view, hidden[rows, cols], _rows(prompts, rows, batch) if s.col0 == 0 else None, codec,
                    row_mask[:, : s.col1] if row_mask is not None else None, adapter, cache,
                )
        finally:
            if owner is not None and budget is not None:
                budget.release(owner)
        return out

    async def run_backward(
        self, view: BlockSpan, hidden: torch.Tensor, grad_outputs: torch.Tensor, prompts: torch.Tensor | None,
        codec: Codec, mask: torch.Tensor | None = None, adapter: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A ``Backward`` in slices of whole rows, like ``run_forward``; ``grad_prompts`` shared by
        every row (``prompts`` with one row) is the sum over the slices."""
        batch = hidden.shape[0]
        slices = plan_slices(batch, hidden.shape[1], self.slice_tokens, by_columns=False)
        if len(slices) == 1:
            return await self.run(self.backward, view, hidden, grad_outputs, prompts, codec, mask, adapter)
        grad_inputs = torch.empty(hidden.shape, dtype=WIRE_DTYPE[Codec(codec)])
        parts = []
        for s in slices:
            rows = slice(s.row0, s.row1)
            grad_inputs[rows], grad_prompts = await self.run(
                self.backward, view, hidden[rows], grad_outputs[rows], _rows(prompts, rows, batch), codec,
                _rows(mask, rows, batch), adapter, False,
            )
            parts.append(grad_prompts)
        if prompts is None:
            return grad_inputs, None
        shared = prompts.shape[1] == 1
        grad_prompts = torch.stack(parts).sum(0) if shared else torch.cat(parts, dim=1)
        return grad_inputs, _finite_on_wire(grad_prompts, codec, "the prompt gradients")

    def _submit(self, future: concurrent.futures.Future[Any], job: Callable[[], None], cost: int) -> None:
        """Queue ``job`` (which resolves ``future``) for the current peer; the worker runs queued jobs
        in fair order. ``BUSY`` past the peer's depth."""
        peer = current_peer.get()
        with self._lock:
            if not self._fair.push(peer, (future, job), cost):
                raise RemoteProtocolError(
                    ErrorCode.BUSY, f"{self._fair.max_per_peer} of your requests already wait on this node; retry later"
                )
        self._executor.submit(self._next_job)

    def _next_job(self) -> None:
        """On the worker: run the next job in fair order (one per submission, so every job runs once)."""
        with self._lock:
            entry = self._fair.pop()
        if entry is not None:
            entry[1]()

    async def run_step(
        self, view: BlockSpan, cache: SpanCache, step: SpanStep, codec: Codec, adapter: str | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """``step`` on the worker; decode steps may share one batched call with other sessions'. A step
        over ``slice_tokens`` (a long prefill) runs in column chunks, each queued fairly on its own
        (``_run_step_chunks``); ``alive`` says whether the session is still open between two chunks."""
        chunks = plan_step_chunks(step.batch, step.tokens, self.slice_tokens)
        if len(chunks) > 1:
            return await self._run_step_chunks(view, cache, step, codec, adapter, chunks, alive)
        if not step.batchable or cache.length != step.position:  # a rollback (§5.6) runs alone
            return await self.run(self.step, view, cache, step, codec, adapter)
        self._check_room()
        item = _Decode(view, cache, step, codec, adapter)
        self._queued += 1
        try:
            with self._lock:
                self._waiting.append(item)
            self._submit(item.future, lambda: self._drain(item), 1)
            # Cancelling the awaiting task cancels ``item.future``; the worker then skips it.
            return await asyncio.wrap_future(item.future)
        finally:
            self._queued -= 1

    async def _run_step_chunks(
        self, view: BlockSpan, cache: SpanCache, step: SpanStep, codec: Codec, adapter: str | None,
        chunks: list[Slice], alive: Callable[[], bool] | None,
    ) -> torch.Tensor:
        """A session step in column chunks appended to the session's own cache (node/slices.py), each
        its own job in the fair queue (never in a batched call): exact, as causal attention reads only
        earlier columns. A ``truncate`` step (§5.6) cuts the cache first. Atomic (§2.6, §5.6.1): if a
        chunk fails, the session closes or the task is cancelled, the cache is put back as it was
        before the step, overwritten columns included, on the worker before the error goes on."""
        # The session's one step in flight: no job touches its cache now, so the (cheap) cut runs here.
        before, padding = cache.length, cache.padding_mask
        saved = _cut(cache, step.position, step.tokens) if step.position < before else None
        outs = []
        try:
            for chunk in chunks:
                if alive is not None and not alive():
                    raise RemoteProtocolError(ErrorCode.UNKNOWN_SESSION, "the session closed while its step ran")
                outs.append(await self.run(self.step, view, cache, step_chunk(step, chunk), codec, adapter))
        except BaseException:
            restore = functools.partial(_restore, cache, before, padding, step.position, saved)
            try:  # after the chunk the worker may still be computing (a cancelled wait does not stop it)
                done = self._executor.submit(restore)
            except RuntimeError:  # the executor shut down: the node stops, nothing else runs
                restore()
            else:
                await asyncio.shield(asyncio.wrap_future(done))
            raise
        return torch.cat(outs, dim=1)

    def _check_room(self) -> None:
        if self._queued >= self.max_queue:
            raise RemoteProtocolError(ErrorCode.BUSY, f"{self._queued} requests queued on this node; retry later or elsewhere")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for item in self._waiting:
                item.future.cancel()
            self._waiting.clear()
            while (entry := self._fair.pop()) is not None:
                entry[0].cancel()  # queued, never to run: its awaiter gets CancelledError
        print(f"batching: {self.stats.line()}", flush=True)

    # ------------------------------------------------------------------ work (worker thread)

    def allocate(self, start: int, end: int, batch_size: int, max_length: int) -> SpanCache:
        return self.view(start, end).allocate_cache(batch_size, max_length)

    def step(
        self, view: BlockSpan, cache: SpanCache, step: SpanStep, codec: Codec, adapter: str | None = None
    ) -> torch.Tensor:
        """One inference step, checked already (node/session_machine.py); on any failure the
        cache is left as it was (spec/messages.md §2.6). A step below the cache's length (a
        ``truncate`` step, §5.6) first cuts the cache to its position; if it then fails, the
        columns it overwrote are put back too."""
        before, padding = cache.length, cache.padding_mask
        overwritten = _cut(cache, step.position, step.tokens) if step.position < before else None
        try:
            with self.adapters.use(adapter):
                out = view.run_step(step, cache)
            out = _finite_on_wire(out, codec, "the step's outputs")
            self.stats.tokens += step.batch * step.tokens
            return out
        except BaseException:
            _restore(cache, before, padding, step.position, overwritten)
            raise

    def _drain(self, item: _Decode) -> None:
        """Run ``item`` (unless an earlier batch took it) with every queued decode step of its span."""
        with self._lock:
            if item.taken:
                return
            batch, seen = [], set()
            for other in self._waiting:
                if len(batch) >= self.max_batch:
                    break
                # same span; one step per cache (a session has one step in flight anyway)
                if other.view is item.view and other.adapter == item.adapter and id(other.cache) not in seen:
                    other.taken = True
                    seen.add(id(other.cache))
                    batch.append(other)
            self._waiting = [w for w in self._waiting if not w.taken]
        batch = [b for b in batch if b.future.set_running_or_notify_cancel()]
        if len(batch) > 1:
            batch = self._run_batched(batch)
        for b in batch:  # alone, or the fallback after a failed batched call
            self.stats.decode_steps += 1
            try:
                b.future.set_result(self.step(b.view, b.cache, b.step, b.codec, b.adapter))
            except BaseException as exc:  # noqa: BLE001 - handed to the step's awaiter
                b.future.set_exception(exc)

    def _run_batched(self, batch: list[_Decode]) -> list[_Decode]:
        """One batched call; returns the steps still to run one by one (all of them on failure)."""
        saved = [(b.cache.length, b.cache.padding_mask) for b in batch]
        try:
            with self.adapters.use(batch[0].adapter):  # one adapter per batch (``_drain``)
                outs = batched_decode_step(batch[0].view, [b.step for b in batch], [b.cache for b in batch])
        except Exception:  # noqa: BLE001 - any failure: rerun one by one, each failing alone
            for b, (length, padding) in zip(batch, saved):
                _rollback(b.cache, length, padding)
            self.stats.fallbacks += 1
            return batch
        self.stats.decode_steps += len(batch)
        self.stats.batched_steps += len(batch)
        self.stats.tokens += sum(b.step.batch * b.step.tokens for b in batch)
        self.stats.batched_calls += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for b, out, (length, padding) in zip(batch, outs, saved):
            try:
                b.future.set_result(_finite_on_wire(out, b.codec, "the step's outputs"))
            except BaseException as exc:  # noqa: BLE001 - NaN in this session's rows: only it fails
                _rollback(b.cache, length, padding)
                b.future.set_exception(exc)
        return []

    def forward(
        self,
        view: BlockSpan,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        codec: Codec,
        mask: torch.Tensor | None = None,
        adapter: str | None = None,
        cache: SpanCache | None = None,
    ) -> torch.Tensor:
        """Stateless: positions 0 .. tokens - 1 in every row, padded or not (spec/messages.md §6.1). With
        ``cache`` (a long row's chunk, node/slices.py): the columns after those in ``cache``, appended to it;
        ``mask`` then covers the row up to this chunk's end."""
        with torch.no_grad(), self.adapters.use(adapter):
            out = view.forward(hidden, attention_mask=mask, prompts=prompts, cache=cache)
        out = _finite_on_wire(out, codec, "the forward outputs")
        self.stats.tokens += hidden.shape[0] * hidden.shape[1]
        return out

    def backward(
        self,
        view: BlockSpan,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        prompts: torch.Tensor | None,
        codec: Codec,
        mask: torch.Tensor | None = None,
        adapter: str | None = None,
        wire_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients on the wire (``wire_prompts`` False: the prompts' gradient as computed, to be summed)."""
        with self.adapters.use(adapter):
            grad_inputs, grad_prompts = view.backward(hidden, grad_outputs, attention_mask=mask, prompts=prompts)
        grad_inputs = _finite_on_wire(grad_inputs, codec, "the input gradients")
        if grad_prompts is not None and wire_prompts:
            grad_prompts = _finite_on_wire(grad_prompts, codec, "the prompt gradients")
        self.stats.tokens += hidden.shape[0] * hidden.shape[1]
        return grad_inputs, grad_prompts


def _run_into(future: concurrent.futures.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    if future.set_running_or_notify_cancel():  # else the caller gave up while it waited
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiter
            future.set_exception(exc)


def _rows(tensor: torch.Tensor | None, rows: slice, batch: int) -> torch.Tensor | None:
    """``rows`` of a per-row tensor (dim 0: a mask; dim 1: prompts ``[n_blocks, batch or 1, P, H]``);
    prompts with one row are every row's and stay whole."""
    if tensor is None:
        return None
    if tensor.ndim == 4:
        return tensor if tensor.shape[1] == 1 and batch != 1 else tensor[:, rows]
    return tensor[rows]


def _cost(args: tuple[Any, ...]) -> int:
    """A job's cost for the fair queue: the tokens (batch x sequence) of its first activation tensor
    (a session step's ``SpanStep.hidden``, or a Forward/Backward's hidden states)."""
    for arg in args:
        if isinstance(arg, SpanStep):
            arg = arg.hidden
        if isinstance(arg, torch.Tensor) and arg.ndim == 3:
            return max(1, arg.shape[0] * arg.shape[1])
    return 1


def _rollback(cache: SpanCache, length: int, padding: torch.Tensor | None) -> None:
    """Forget positions appended by a failed step: attention reads only the filled prefix."""
    for layer in cache.cache.layers:
        layer.cumulative_length.fill_(length)
    cache.length = length
    cache.padding_mask = padding


def _cut(cache: SpanCache, position: int, tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A ``truncate`` step's cut (§5.6.1): the cache to ``position`` columns; returns the columns its
    ``tokens`` will overwrite, for ``_restore``."""
    saved = _columns(cache, position, min(cache.length, position + tokens))
    padding = cache.padding_mask
    _rollback(cache, position, None if padding is None else padding[:, :position])
    return saved


def _restore(
    cache: SpanCache, length: int, padding: torch.Tensor | None, position: int,
    saved: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> None:
    """Put ``cache`` back as it was before a failed step: the columns it overwrote from ``position``
    (``saved``, None: none), then its length and padding mask (§2.6)."""
    if saved is not None:
        _put_columns(cache, position, saved)
    _rollback(cache, length, padding)


def _columns(cache: SpanCache, a: int, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A copy of the keys and values of columns ``[a, b)`` in every block (what a rollback step overwrites)."""
    return [(layer.keys[:, :, a:b].clone(), layer.values[:, :, a:b].clone()) for layer in cache.cache.layers]


def _put_columns(cache: SpanCache, a: int, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write back what ``_columns`` copied from column ``a`` on."""
    for layer, (keys, values) in zip(cache.cache.layers, saved):
        layer.keys[:, :, a:a + keys.shape[2]].copy_(keys)
        layer.values[:, :, a:a + values.shape[2]].copy_(values)
