"""Errors the client raises to its user, each saying what to do about it.

``MissingBlocksError`` (routing) is re-exported here. Internally a failed peer
is a ``PeerFailure`` (its session or call failed: connection lost, deadline
passed, an ``Error`` reply, an invalid reply); the session manager reacts by
avoiding the peer and re-routing. Only when that is no longer possible does the
user see a ``SwarmError``.
"""

from __future__ import annotations

from biopetals.protocol.errors import ErrorCode, ProtocolError

from .routing import MissingBlocksError

__all__ = ["MissingBlocksError", "PeerFailure", "SwarmError", "describe_code"]

_HINTS = {
    ErrorCode.CACHE_BUDGET: "the node has no KV-cache room for this session: use a smaller max_length or wait",
    ErrorCode.BUSY: "the node is overloaded",
    ErrorCode.TIMEOUT: "the node did not answer in time",
    ErrorCode.MODEL_MISMATCH: "the node serves another model: check the model path/name matches the swarm's",
    ErrorCode.UNKNOWN_ADAPTER: "the node does not hold this adapter (stale announcement)",
    ErrorCode.BLOCKS_NOT_SERVED: "the node no longer serves these blocks (stale announcement)",
    ErrorCode.SWARM_KEY_MISMATCH: "wrong swarm key: pass the swarm's key file as swarm_key=",
    ErrorCode.CONNECTION_CLOSED: "the connection to the node was lost",
}


def describe_code(code: int) -> str:
    try:
        name = ErrorCode(code).name
    except ValueError:
        name = f"code {code}"
    hint = _HINTS.get(code)  # type: ignore[call-overload]
    return f"{name} ({hint})" if hint else name


class PeerFailure(Exception):
    """A peer failed a call or a session step; the caller avoids it and re-routes."""

    def __init__(self, peer_id: str, reason: str, code: int | None = None) -> None:
        self.peer_id = peer_id
        self.reason = reason
        self.code = code
        super().__init__(f"peer {peer_id}: {reason}")


class SwarmError(RuntimeError):
    """The swarm could not complete a request even after re-routing; the message says why and what to do."""

    def __init__(self, message: str, failures: list[PeerFailure] | None = None) -> None:
        self.failures = list(failures or [])
        if self.failures:
            message += " Failures: " + "; ".join(str(f) for f in self.failures[-6:])
        super().__init__(message)


def peer_failure_from(peer_id: str, exc: BaseException) -> PeerFailure:
    """Turn a transport/protocol exception into a ``PeerFailure`` with a readable reason."""
    if isinstance(exc, PeerFailure):
        return exc
    if isinstance(exc, ProtocolError):
        return PeerFailure(peer_id, f"{describe_code(exc.code)}: {exc.message}", int(exc.code))
    if isinstance(exc, TimeoutError):
        return PeerFailure(peer_id, "deadline passed", int(ErrorCode.TIMEOUT))
    return PeerFailure(peer_id, f"{type(exc).__name__}: {exc}")
