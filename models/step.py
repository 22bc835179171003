"""One inference step for a span's KV cache, as the blocks run it: a frozen value, checked once before.

See spec/messages.md §5.6 (positions) and §8.1 (padding mask). The node's session state
machine (node/session_machine.py) checks a ``Step``/``Push`` against its session and
builds a ``SpanStep`` with ``span_step``; ``models/blocks.py`` computes it without
checking it again. ``positions_from_mask`` is the one place where rotary positions are
derived from a padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SpanStep", "positions_from_mask", "span_step"]


def positions_from_mask(mask: torch.Tensor | None, start: int, tokens: int) -> torch.Tensor:
    """Rotary positions of columns ``[start, start + tokens)`` (spec/messages.md §5.6).

    ``mask``: bool or 0/1 ``[batch, >= start + tokens]`` over the whole row (True = a
    real token), or None when no column is padding. A token's position is the number
    of real tokens before it in its row (``cumsum(mask) - 1``), padding gets 0: exactly
    what transformers' ``generate()`` computes for a left-padded batch. Without a
    mask: the columns themselves, ``[1, tokens]``.
    """
    if mask is None:
        return torch.arange(start, start + tokens).unsqueeze(0)
    mask = mask[:, : start + tokens].to(torch.bool)
    return (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)[:, start:]


@dataclass(frozen=True, eq=False)
class SpanStep:
    """New tokens for a cache holding ``position`` columns, with everything the blocks need.

    ``mask`` covers the whole row, ``[batch, position + tokens]`` (None: no padding in
    the session so far nor in this step); ``positions`` ``[batch or 1, tokens]``;
    ``prompts`` ``[n_blocks, batch or 1, prefix, hidden]`` for this span only.
    """

    hidden: torch.Tensor
    position: int
    positions: torch.Tensor
    mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    #: the step itself had no padding (its own tokens are all real)
    all_real: bool = True

    @property
    def batch(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def batchable(self) -> bool:
        """A single real token without prompts: it may share a batched decode call (spec §5.9)."""
        return self.tokens == 1 and self.prompts is None and self.all_real


def span_step(
    hidden: torch.Tensor,
    position: int,
    past_mask: torch.Tensor | None = None,
    new_mask: torch.Tensor | None = None,
    prompts: torch.Tensor | None = None,
) -> SpanStep:
    """The ``SpanStep`` of ``hidden`` ``[batch, tokens, hidden]`` after ``position`` columns.

    ``past_mask``: bool ``[batch, position]`` of the columns already in the cache (None:
    all real); ``new_mask``: ``[batch, tokens]`` of the new ones (None: all real).
    """
    batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
    mask = None
    if past_mask is not None or new_mask is not None:
        past = past_mask if past_mask is not None else torch.ones(batch, position, dtype=torch.bool)
        new = new_mask if new_mask is not None else torch.ones(batch, tokens, dtype=torch.bool)
        mask = torch.cat([past.to(device="cpu", dtype=torch.bool), new.to(device="cpu", dtype=torch.bool)], dim=1)
    return SpanStep(
        hidden=hidden,
        position=position,
        positions=positions_from_mask(mask, position, tokens),
        mask=mask,
        prompts=prompts,
        all_real=new_mask is None,
    )
