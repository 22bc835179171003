"""What a stream needs from its connection: the one interface between streams/unary and connection.py.

``Stream`` (streams.py) and the unary stand-ins (unary.py) live inside a ``Connection``
and call back into it - to queue frames on its multiplexer, flush, wait for the socket,
reserve receive budget and leave its stream table. ``StreamLink`` names exactly that
surface, so those modules depend on this interface instead of importing connection.py
(which imports them): no import cycle, type-only ones included (issue 25).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from biopetals.protocol.identity import PeerId
from biopetals.protocol.mux import Mux

from .budget import ConnectionBudget

__all__ = ["StreamLink"]


class StreamLink(Protocol):
    """The connection as its streams see it (implemented by ``Connection``)."""

    peer_id: PeerId
    _loop: asyncio.AbstractEventLoop
    _mux: Mux
    _budget: ConnectionBudget
    _streams: dict[int, Any]
    _write_paused: bool

    def _flush(self) -> None:
        """Encrypt and write whatever the multiplexer has queued (coalesced per loop turn)."""

    def _flush_now(self) -> None:
        """Write at once: no view of a caller's buffer may outlive the call."""

    async def _wait_writable(self) -> None:
        """Wait while the socket's write buffer is above its high-water mark."""

    def _stream_maybe_done(self, stream: Any) -> None:
        """Drop ``stream`` from the table if the multiplexer closed it both ways."""

    def _stream_failed(self, stream: Any) -> None:
        """``stream`` was reset or lost: drop it from the table."""

    def _drop_stream(self, stream: Any) -> None:
        """Drop ``stream`` from the table (and close a retiring connection left empty)."""
