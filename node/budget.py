"""KV-cache memory accounting: a per-session and a total budget, reserved up front.

See spec/messages.md §5.1 (``CACHE_BUDGET``) and §4.2 (``cache_tokens_left``). The
budget counts bytes; it reports capacity in *node tokens*: one token of KV cache
over every block the node serves (a session over a sub-span costs proportionally
less). Sans-IO: it decides, the caller allocates.
"""

from __future__ import annotations

from dataclasses import dataclass

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

__all__ = ["CacheBudget", "BudgetStatistics"]


@dataclass(frozen=True)
class BudgetStatistics:
    total_bytes: int
    reserved_bytes: int
    sessions: int
    tokens_left: int


class CacheBudget:
    """Reservations of KV-cache bytes against a total and a per-session limit.

    ``bytes_per_token`` is the cache size of one token over the node's whole span;
    ``total_tokens`` and ``session_tokens`` are in those tokens.
    """

    def __init__(self, bytes_per_token: int, total_tokens: int, session_tokens: int | None = None) -> None:
        if bytes_per_token <= 0 or total_tokens < 0:
            raise ValueError("bytes_per_token must be > 0 and total_tokens >= 0")
        self.bytes_per_token = bytes_per_token
        self.total_bytes = bytes_per_token * total_tokens
        self.session_bytes = bytes_per_token * (total_tokens if session_tokens is None else session_tokens)
        self._reserved: dict[bytes, int] = {}

    @property
    def reserved_bytes(self) -> int:
        return sum(self._reserved.values())

    @property
    def tokens_left(self) -> int:
        """Node tokens still free for new sessions (``cache_tokens_left``, spec/messages.md §4.2)."""
        return max(0, self.total_bytes - self.reserved_bytes) // self.bytes_per_token

    def reserve(self, owner: bytes, nbytes: int) -> None:
        """Reserve ``nbytes`` for ``owner`` or raise ``CACHE_BUDGET`` saying which limit it breaks."""
        if owner in self._reserved:
            raise ValueError(f"{owner.hex()} already holds a reservation")
        if nbytes > self.session_bytes:
            raise RemoteProtocolError(
                ErrorCode.CACHE_BUDGET,
                f"the session needs {nbytes} bytes of KV cache; this node allows {self.session_bytes} per session",
            )
        free = self.total_bytes - self.reserved_bytes
        if nbytes > free:
            raise RemoteProtocolError(
                ErrorCode.CACHE_BUDGET,
                f"the session needs {nbytes} bytes of KV cache; {max(free, 0)} of {self.total_bytes} are free now",
            )
        self._reserved[owner] = nbytes

    def release(self, owner: bytes) -> int:
        """Free ``owner``'s reservation (no-op if none); returns the bytes freed."""
        return self._reserved.pop(owner, 0)

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.total_bytes, self.reserved_bytes, len(self._reserved), self.tokens_left)
