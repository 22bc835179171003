"""How a large Forward/Backward or a long session step is cut into bounded slices, so other peers' steps run between them.

Issue 21 (item 6): one maximum-size ``Forward`` (8192 tokens) held the node's single worker for
its whole duration, so a fair queue (node/fair_queue.py) could not help an honest decode step
that arrived just after it. The node therefore runs a large request as consecutive *slices*,
each queued on its own through the fair queue: between two slices of one peer, the other
peers' waiting jobs get their turns. See spec/messages.md §7.2 (``BUSY``: fair turns, slices,
the unsplit computation's result) and §5.1 (the cache a long row's chunks need is reserved like
a session's, for the peer).

Two cuts keep the result exact (the same computation, up to floating-point summation order):

* **by rows**: rows of a batch never interact (each has its own positions, mask and, when
  ``prompts`` has one row per sequence, prompts), so groups of whole rows are computed apart
  and concatenated. A ``Backward``'s ``grad_prompts`` shared by all rows (``prompts`` with one
  row) is the sum over the groups.
* **by columns** (``Forward`` only): a causal stack computes columns ``[c0, c1)`` of a row from
  the keys and values of columns ``< c1`` alone, so a row longer than the slice runs chunk by
  chunk into a KV cache over its earlier chunks, positions ``c0 ..`` as in the unsplit call
  (§6.1: positions ``0 .. tokens - 1``). The first chunk holds every prompt position.
  A ``Backward`` is cut by rows only (its gradient would have to flow back through the cache).

A session's ``Step``/``Push`` over the bound (a long prefill) is cut the second way too, into
the session's *own* KV cache (``plan_step_chunks``, ``step_chunk``): every chunk holds all the
step's rows and consecutive columns, ``rows x columns <= slice_tokens`` (at least one column),
so a 4096-token prefill no longer holds the worker for its whole compute. A chunk's mask is the
step's whole-row mask up to the chunk's last column, and it gets the part of the step's deep
prompts (which apply to the step's first ``prefix`` columns) that its columns cover: the cut is
exact. If a chunk fails, the backend puts the cache back as it was before the step
(spec/messages.md §2.6, §5.6.1).

Sans-IO: this module only plans; node/backend.py runs the slices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # models.step imports torch; node/options.py (and so node/cli.py) imports this module before torch
    from biopetals.models.step import SpanStep

__all__ = ["SLICE_TOKENS", "Slice", "plan_slices", "plan_step_chunks", "step_chunk"]

#: Default bound of one slice's compute, in tokens (rows x columns); ``--compute-slice-tokens``.
SLICE_TOKENS: Final = 512


@dataclass(frozen=True)
class Slice:
    """Rows ``[row0, row1)`` and columns ``[col0, col1)`` of a request's ``[batch, tokens]``."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def cost(self) -> int:
        """Tokens computed: the slice's cost in the fair queue."""
        return (self.row1 - self.row0) * (self.col1 - self.col0)


def plan_slices(
    batch: int, tokens: int, slice_tokens: int = SLICE_TOKENS, *, by_columns: bool = True, first_columns: int = 0
) -> list[Slice]:
    """The slices of a ``[batch, tokens]`` request, in the order they run.

    Rows are grouped so that a group has at most ``slice_tokens`` tokens (at least one row).
    A single row longer than ``slice_tokens`` is cut into column chunks of ``slice_tokens``
    when ``by_columns`` (the first chunk has at least ``first_columns`` columns: the prompt
    positions), else it stays one slice. Slices of one row group appear in column order.
    """
    if batch < 1 or tokens < 1:
        raise ValueError("batch and tokens must be >= 1")
    if slice_tokens < 1 or not 0 <= first_columns <= tokens:
        raise ValueError("slice_tokens must be >= 1 and 0 <= first_columns <= tokens")
    if tokens <= slice_tokens or not by_columns:
        rows = max(1, slice_tokens // tokens)
        return [Slice(r, min(r + rows, batch), 0, tokens) for r in range(0, batch, rows)]
    cuts = [0, max(slice_tokens, first_columns)]
    while cuts[-1] < tokens:
        cuts.append(cuts[-1] + slice_tokens)
    cuts[-1] = tokens
    return [Slice(r, r + 1, c0, c1) for r in range(batch) for c0, c1 in zip(cuts, cuts[1:])]


def plan_step_chunks(batch: int, tokens: int, slice_tokens: int = SLICE_TOKENS) -> list[Slice]:
    """The column chunks of a session step ``[batch, tokens]``, in the order they run.

    One chunk (the whole step) when ``batch x tokens <= slice_tokens``; else chunks of every row
    and ``max(1, slice_tokens // batch)`` consecutive columns (the last one shorter). Rows are never
    cut: they share the session's cache. A batch wider than the bound runs one column per chunk.
    """
    if batch < 1 or tokens < 1 or slice_tokens < 1:
        raise ValueError("batch, tokens and slice_tokens must be >= 1")
    if batch * tokens <= slice_tokens:
        return [Slice(0, batch, 0, tokens)]
    width = max(1, slice_tokens // batch)
    return [Slice(0, batch, c, min(c + width, tokens)) for c in range(0, tokens, width)]


def step_chunk(step: SpanStep, chunk: Slice) -> SpanStep:
    """The part of ``step`` in ``chunk``'s columns, as a step of its own after the columns before it.

    Position ``step.position + col0``; rotary positions and hidden states of its columns; the
    whole-row mask up to its last column (what the cache holds after it); the deep prompts' columns
    it covers (None past the prompts' ``prefix``).
    """
    c0, c1 = chunk.col0, chunk.col1
    if (chunk.row0, chunk.row1) != (0, step.batch) or not 0 <= c0 < c1 <= step.tokens:
        raise ValueError(f"chunk {chunk} is not a column range of a [{step.batch}, {step.tokens}] step")
    prompts = step.prompts
    if prompts is not None:
        prompts = prompts[:, :, c0:c1] if c0 < prompts.shape[2] else None
    return replace(
        step,
        hidden=step.hidden[:, c0:c1],
        position=step.position + c0,
        positions=step.positions[:, c0:c1],
        mask=step.mask[:, : step.position + c1] if step.mask is not None else None,
        prompts=prompts,
    )
