"""How the client splits a request the model allows into messages under the spec's limits.

Sans-IO and pure (no clock, no I/O): the chain state (client/chain.py) asks it how
many tokens one ``Step`` may carry and how many sequences one ``Forward``/``Backward``
may carry, then sends the pieces in order. See spec/tensors.md §2: a receiver rejects
any tensor over ``MAX_TENSOR_ELEMENTS`` and any frame over ``MAX_FRAME_BYTES``, and a
sender MUST NOT produce them (it splits the request into smaller batches or fewer
tokens per step).

The rule, one for every message: a piece holds as many tokens (``Step``: columns of
the whole batch; ``Forward``/``Backward``: whole sequences) as keep

* every tensor it carries within ``max_elements`` (``hidden``/``grad`` are
  ``[batch, tokens, hidden]``, deep prompts ``[blocks, batch, prefix, hidden]``),
* the whole message within ``max_frame_bytes`` less ``reserve_bytes`` for the
  envelope, the hops and the padding mask (one byte per token), at the codec's
  bytes per element (``f32``: 4, else 2; ``f16+zstd`` is counted uncompressed,
  which bounds it within zstd's per-block overhead, covered by the reserve),
* and, for ``Forward``/``Backward``, ``batch x tokens`` within ``max_call_tokens``
  (a node's ``max_forward_tokens``, 8192 by default; nodes do not announce it) and the
  batch within ``MAX_BATCH``.

So the piece size follows from the limits and the model's width, never from one model:
a 4200-token prefill of hidden size 4096 goes in two steps of at most 4096 tokens, at
hidden size 576 in one. A stateless ``Forward``/``Backward`` cannot split one sequence
(its attention needs all of it in one call), so a single sequence over the limits is
refused before anything is sent, with what to do.

Chunked prefill gives the same result as one piece: each chunk is an ordinary step
at the next position (spec/messages.md §5.6), its padding mask and its share of the
deep prompts (which apply to the prefill's first ``prefix`` tokens) travel with it, and
the chain state records it in the span's history, so a replay re-sends the same chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

from biopetals.protocol.limits import MAX_BATCH, MAX_FRAME_BYTES, MAX_TENSOR_ELEMENTS, MiB

__all__ = ["Chunking", "element_bytes", "pieces"]

#: Bytes per element of each codec before compression (spec/tensors.md §4).
_ELEMENT_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f16+zstd": 2}


def element_bytes(codec: str) -> int:
    try:
        return _ELEMENT_BYTES[str(codec)]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}: one of {', '.join(_ELEMENT_BYTES)}") from None


def pieces(total: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive pieces of at most ``size`` covering ``range(total)``."""
    if size < 1:
        raise ValueError(f"a piece needs a size of at least 1, got {size}")
    return [(a, min(a + size, total)) for a in range(0, total, size)]


@dataclass(frozen=True)
class Chunking:
    """The limits one client sends under (named parameters; defaults: spec/tensors.md §2).

    A sender MAY use smaller limits than the spec's (``max_elements`` below
    ``MAX_TENSOR_ELEMENTS``), never larger."""

    codec: str = "f32"
    max_elements: int = MAX_TENSOR_ELEMENTS
    max_frame_bytes: int = MAX_FRAME_BYTES
    reserve_bytes: int = 1 * MiB  # envelope, hops, mask and zstd overhead
    max_call_tokens: int = 8192  # batch x tokens in one Forward/Backward (a node's max_forward_tokens)

    def __post_init__(self) -> None:
        element_bytes(self.codec)
        if not 0 < self.max_elements <= MAX_TENSOR_ELEMENTS:
            raise ValueError(f"max_elements must be in [1, {MAX_TENSOR_ELEMENTS}] (spec/tensors.md §2), "
                             f"got {self.max_elements}")
        if not 0 <= self.reserve_bytes < self.max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"need 0 <= reserve_bytes < max_frame_bytes <= {MAX_FRAME_BYTES}")
        if self.max_call_tokens < 1:
            raise ValueError("max_call_tokens must be at least 1")

    @property
    def _payload(self) -> int:
        return self.max_frame_bytes - self.reserve_bytes

    def step_tokens(self, batch: int, hidden: int, prompt_blocks: int = 0) -> int:
        """Most tokens of ``batch`` sequences one ``Step`` (and its ``Push``/``StepResult``) may carry.

        ``prompt_blocks``: blocks whose deep prompts travel with it (0: none), the whole
        rest of the chain when the step is pushed. At least 1 whenever a single token fits."""
        per_token = batch * hidden  # elements of hidden per token column
        tokens = self.max_elements // per_token
        if prompt_blocks:
            tokens = min(tokens, self.max_elements // (prompt_blocks * per_token))
        bytes_per_token = per_token * element_bytes(self.codec) * (1 + prompt_blocks) + batch  # + mask
        return min(tokens, self._payload // bytes_per_token)

    def call_rows(self, tokens: int, hidden: int, tensors: int, prompt_blocks: int = 0, prefix: int = 0) -> int:
        """Most sequences of ``tokens`` one ``Forward`` (``tensors`` = 1) or ``Backward`` (2: inputs and
        gradients) may carry, with deep prompts ``[prompt_blocks, rows, prefix, hidden]``. 0: not even one."""
        per_row = tokens * hidden
        rows = min(self.max_elements // per_row, self.max_call_tokens // tokens, MAX_BATCH)
        if prompt_blocks and prefix:
            rows = min(rows, self.max_elements // (prompt_blocks * prefix * hidden))
        bytes_per_row = (tensors * per_row + prompt_blocks * prefix * hidden) * element_bytes(self.codec) + tokens
        return min(rows, self._payload // bytes_per_row)

    def call_refusal(self, tokens: int, hidden: int, prompt_blocks: int = 0, prefix: int = 0) -> str:
        """Why a single sequence of ``tokens`` (with deep prompts) cannot go in one call, and what to do."""
        limits = (f"{self.max_elements} elements a tensor, {self.max_frame_bytes} bytes a frame at {self.codec}, "
                  f"{self.max_call_tokens} tokens a call; spec/tensors.md §2")
        if prefix and self.call_rows(prefix, hidden, 2, prompt_blocks, prefix) < 1:
            return (f"the deep prompts of {prompt_blocks} blocks x {prefix} positions at hidden size {hidden} are over "
                    f"the limits of one Forward/Backward message ({limits}): use fewer prompt positions")
        lo, hi = 0, tokens  # the longest sequence that fits: calls fit for lengths <= lo, not for > hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self.call_rows(mid, hidden, 2, prompt_blocks, min(prefix, mid)) >= 1
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return (f"one sequence of {tokens} tokens at hidden size {hidden} is over the limits of one Forward/Backward "
                f"message ({limits}), and a stateless call cannot split a sequence: use sequences of at most {lo} "
                "tokens (or an inference session, which splits a prefill into steps)")
