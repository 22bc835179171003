"""Inference sessions: state and rules, without I/O.

See spec/messages.md §5 (sessions), §5.6 (positions), §5.7 (duplicates) and §5.9
(lifetime). A ``Session`` knows its span, its reserved ``SpanCache``, how many
positions it holds and the last ``step_id`` it processed; ``SessionTable`` holds the
open sessions. Time is an argument (``now``, seconds on any monotonic clock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.tensors import Codec

__all__ = ["Session", "SessionTable"]


@dataclass(eq=False)
class Session:
    """One open session (spec/messages.md §5). ``cache`` is a ``models.blocks.SpanCache``."""

    session_id: bytes
    start: int
    end: int
    batch_size: int
    max_length: int
    codec: Codec
    cache: Any
    span: Any  # the BlockSpan view of [start, end)
    last_activity: float
    last_step_id: int | None = None
    closed: bool = False
    owner: Any = field(default=None, repr=False)  # the session stream's sender (node/handler.py)
    adapter: str | None = None  # the server-side adapter of every step (spec/messages.md §6.3)

    @property
    def length(self) -> int:
        """Positions held in the cache."""
        return int(self.cache.length)

    def is_duplicate(self, step_id: int) -> bool:
        """A step this session already processed, or an older one (§5.7)."""
        return self.last_step_id is not None and step_id <= self.last_step_id

    def check_step(self, position: int, tokens: int, batch: int, hidden_size: int, model_hidden: int) -> None:
        """The node's checks of a ``Step``/``Push`` after duplicates (§5.3 last paragraph, §5.6)."""
        if batch != self.batch_size:
            raise RemoteProtocolError(
                ErrorCode.INVALID_TENSOR, f"hidden batch {batch} != the session's batch_size {self.batch_size}"
            )
        if hidden_size != model_hidden:
            raise RemoteProtocolError(
                ErrorCode.HIDDEN_SIZE_MISMATCH, f"hidden size {hidden_size}; this model's is {model_hidden}"
            )
        if position != self.length:
            raise RemoteProtocolError(
                ErrorCode.BAD_POSITION, f"position {position}; the session holds {self.length} positions, so must be {self.length}"
            )
        if position + tokens > self.max_length:
            raise RemoteProtocolError(
                ErrorCode.BAD_POSITION, f"position {position} + {tokens} tokens > max_length {self.max_length}"
            )

    def idle_deadline(self, idle_timeout: float) -> float:
        return self.last_activity + idle_timeout


class SessionTable:
    """The open sessions of a node, by id."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._sessions: dict[bytes, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: bytes) -> bool:
        return session_id in self._sessions

    def add(self, session: Session) -> None:
        if session.session_id in self._sessions:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, f"a session with id {session.session_id.hex()} is already open on this node"
            )
        self._sessions[session.session_id] = session

    def get(self, session_id: bytes) -> Session:
        """The open session, or ``UNKNOWN_SESSION`` (§5.9)."""
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_SESSION, f"session {session_id.hex()} is not open on this node (never opened, closed or expired)"
            )
        return session

    def remove(self, session_id: bytes) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
        return session

    def expired(self, now: float) -> list[Session]:
        """Sessions idle for longer than ``idle_timeout`` at ``now``."""
        return [s for s in self._sessions.values() if now >= s.idle_deadline(self.idle_timeout)]

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())
