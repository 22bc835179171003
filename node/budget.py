"""KV-cache memory accounting: a per-session, a per-peer and a total budget, reserved up front.

See spec/messages.md §5.1 (``CACHE_BUDGET``) and §4.2 (``cache_tokens_left``). The per-peer
share (issue 21, item 6) keeps one peer from taking the whole cache: the sessions of one
peer hold at most ``peer_share`` of the total, so while it holds that much, the rest stays
for the others (``--max-peer-cache-share``, default 0.5). The budget counts bytes; it reports capacity in *node tokens*: one token of KV cache
over every block the node serves (a session over a sub-span costs proportionally
less). Sans-IO: it decides, the caller allocates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Hashable

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

__all__ = ["CacheBudget", "BudgetStatistics", "PEER_SHARE"]

#: Default share of the total budget the sessions of one peer may hold (``--max-peer-cache-share``).
PEER_SHARE: Final = 0.5


@dataclass(frozen=True)
class BudgetStatistics:
    total_bytes: int
    reserved_bytes: int
    sessions: int
    tokens_left: int


class CacheBudget:
    """Reservations of KV-cache bytes against a total and a per-session limit.

    ``bytes_per_token`` is the cache size of one token over the node's whole span;
    ``total_tokens`` and ``session_tokens`` are in those tokens; ``peer_share`` (0 < share <= 1)
    is the fraction of the total one peer's reservations may hold.
    """

    def __init__(
        self, bytes_per_token: int, total_tokens: int, session_tokens: int | None = None, *,
        peer_share: float = PEER_SHARE,
    ) -> None:
        if bytes_per_token <= 0 or total_tokens < 0:
            raise ValueError("bytes_per_token must be > 0 and total_tokens >= 0")
        if not 0 < peer_share <= 1:
            raise ValueError("peer_share must be in (0, 1]")
        self.bytes_per_token = bytes_per_token
        self.total_bytes = bytes_per_token * total_tokens
        self.session_bytes = bytes_per_token * (total_tokens if session_tokens is None else session_tokens)
        self.peer_share = peer_share
        # one session of the per-session limit always fits a peer's share, however small the share
        self.peer_bytes = max(int(self.total_bytes * peer_share), min(self.session_bytes, self.total_bytes))
        self._reserved: dict[bytes, tuple[Hashable, int]] = {}  # owner -> (peer, bytes)

    @property
    def reserved_bytes(self) -> int:
        return sum(n for _, n in self._reserved.values())

    def peer_reserved(self, peer: Hashable) -> int:
        """Bytes reserved by ``peer``'s sessions."""
        return sum(n for p, n in self._reserved.values() if p == peer)

    @property
    def tokens_left(self) -> int:
        """Node tokens still free for new sessions (``cache_tokens_left``, spec/messages.md §4.2)."""
        return max(0, self.total_bytes - self.reserved_bytes) // self.bytes_per_token

    def reserve(self, owner: bytes, nbytes: int, peer: Hashable = None, *, per_session: bool = True) -> None:
        """Reserve ``nbytes`` for ``owner`` (a session of ``peer``) or raise ``CACHE_BUDGET`` saying which
        limit it breaks: the per-session one (unless not ``per_session``: the cache of a long ``Forward``
        row, node/slices.py), the peer's share, then the total."""
        if owner in self._reserved:
            raise ValueError(f"{owner.hex()} already holds a reservation")
        if per_session and nbytes > self.session_bytes:
            raise RemoteProtocolError(
                ErrorCode.CACHE_BUDGET,
                f"the session needs {nbytes} bytes of KV cache; this node allows {self.session_bytes} per session",
            )
        held = self.peer_reserved(peer) if self.peer_share < 1 else 0
        if self.peer_share < 1 and held + nbytes > self.peer_bytes:
            raise RemoteProtocolError(
                ErrorCode.CACHE_BUDGET,
                f"the session needs {nbytes} bytes of KV cache; your sessions hold {held} already and one peer may "
                f"hold {self.peer_bytes} ({self.peer_share:g} of this node's {self.total_bytes})",
            )
        free = self.total_bytes - self.reserved_bytes
        if nbytes > free:
            raise RemoteProtocolError(
                ErrorCode.CACHE_BUDGET,
                f"the session needs {nbytes} bytes of KV cache; {max(free, 0)} of {self.total_bytes} are free now",
            )
        self._reserved[owner] = (peer, nbytes)

    def release(self, owner: bytes) -> int:
        """Free ``owner``'s reservation (no-op if none); returns the bytes freed."""
        return self._reserved.pop(owner, (None, 0))[1]

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(self.total_bytes, self.reserved_bytes, len(self._reserved), self.tokens_left)
