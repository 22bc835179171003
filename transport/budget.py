"""Receive budget: bytes a node holds for partially received messages, bounded three ways.

See spec/transport.md §3.16 ("Resource limits"). A message on a stream is
announced by its 4-byte length prefix (spec/tensors.md §6) and may then arrive
slowly; while it is being assembled its bytes sit in the node's memory. Before a
receiver takes a single byte of a message's body - before it grants flow-control
credit for it - it *reserves* the declared size here:

* per stream: a message larger than ``per_stream`` is refused;
* per connection: the messages one connection is assembling at once hold at most
  ``per_connection`` bytes;
* per node: every connection together holds at most ``per_node`` bytes.

``reserve`` returns a decision the caller acts on; nothing here does I/O or keeps
time. A message over the per-stream limit is refused for good (``Refusal.fatal``:
the caller resets the stream with its typed code). A message that does not fit
the connection's or the node's remaining budget *waits*: the caller leaves its
bytes unconsumed, so no credit goes back to the sender, and registers with
``wait``; ``release`` hands back the waiters to retry once bytes are freed. A
reservation is released once the message is complete (handed to the
application) or its stream ends. Because the whole declared size is reserved up
front, an admitted message can always complete: streams never deadlock waiting
for each other's credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from biopetals.protocol.errors import ErrorCode, LocalProtocolError
from biopetals.protocol.limits import MAX_FRAME_BYTES, MiB

__all__ = [
    "MAX_MESSAGE_BUFFER",
    "MAX_CONNECTION_BUFFER",
    "MAX_NODE_BUFFER",
    "Refusal",
    "ReceiveBudget",
    "ConnectionBudget",
]

#: Default largest message one stream may be assembling (the spec's own frame limit).
MAX_MESSAGE_BUFFER: Final = MAX_FRAME_BYTES
#: Default bytes one connection's partial messages may hold together: one largest
#: message plus room for small ones beside it.
MAX_CONNECTION_BUFFER: Final = MAX_FRAME_BYTES + 16 * MiB
#: Default bytes every connection's partial messages may hold together.
MAX_NODE_BUFFER: Final = 256 * MiB


@dataclass(frozen=True)
class Refusal:
    """Why a message was not admitted: the code to reset its stream with (if ``fatal``), and the reason.

    Not ``fatal``: the message fits the limits but not what is free now; it waits.
    """

    code: ErrorCode
    reason: str
    fatal: bool


class ReceiveBudget:
    """The node-wide ledger; ``connection()`` gives each connection its own share of it."""

    __slots__ = ("per_stream", "per_connection", "per_node", "held", "refused", "deferred", "_waiters")

    def __init__(
        self,
        per_stream: int = MAX_MESSAGE_BUFFER,
        per_connection: int = MAX_CONNECTION_BUFFER,
        per_node: int = MAX_NODE_BUFFER,
    ) -> None:
        if not 1 <= per_stream <= per_connection <= per_node:
            raise LocalProtocolError(
                ErrorCode.INVALID_FIELD,
                f"receive budget must satisfy 1 <= per_stream ({per_stream}) <= per_connection ({per_connection}) <= per_node ({per_node})",
            )
        self.per_stream = per_stream
        self.per_connection = per_connection
        self.per_node = per_node
        self.held = 0  # bytes reserved over all connections
        self.refused = 0  # messages refused since start (over the per-stream limit)
        self.deferred = 0  # times a message had to wait for budget, since start
        self._waiters: list[object] = []  # what waits for budget to be released, oldest first

    def connection(self) -> ConnectionBudget:
        return ConnectionBudget(self)

    def wait(self, waiter: object) -> None:
        """``waiter`` retries its reservation once some budget is released (see ``release``)."""
        self._waiters.append(waiter)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class ConnectionBudget:
    """One connection's reservations against the node's ``ReceiveBudget``."""

    __slots__ = ("node", "held")

    def __init__(self, node: ReceiveBudget) -> None:
        self.node = node
        self.held = 0

    def reserve(self, size: int) -> Refusal | None:
        """Reserve ``size`` bytes for one message; a ``Refusal`` (nothing reserved) if a limit says no."""
        node = self.node
        if size > node.per_stream:
            node.refused += 1
            return Refusal(ErrorCode.LIMIT_EXCEEDED, f"message of {size} bytes exceeds the receiver's per-stream limit {node.per_stream}", True)
        if self.held + size > node.per_connection:
            node.deferred += 1
            return Refusal(ErrorCode.LIMIT_EXCEEDED, f"connection holds {self.held} of {node.per_connection} bytes of unfinished messages", False)
        if node.held + size > node.per_node:
            node.deferred += 1
            return Refusal(ErrorCode.BUSY, f"node holds {node.held} of {node.per_node} bytes of unfinished messages", False)
        self.held += size
        node.held += size
        return None

    def release(self, size: int) -> list[object]:
        """Give back ``size`` bytes of an earlier reservation (the message completed or was dropped).

        Returns what waited for budget (each to retry its reservation), oldest first.
        """
        size = min(size, self.held)
        self.held -= size
        node = self.node
        node.held -= size
        if not size or not node._waiters:
            return []
        waiters, node._waiters = node._waiters, []
        return waiters

    def close(self) -> list[object]:
        """The connection is gone: everything it held goes back to the node (returns the waiters)."""
        return self.release(self.held)
