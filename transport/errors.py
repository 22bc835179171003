"""Errors the asyncio transport raises to its callers.

Every one is a ``ProtocolError`` carrying an ``ErrorCode``, so callers can branch on
``exc.code`` whatever layer failed. Handshake failures (SWARM_KEY_MISMATCH,
PEER_ID_MISMATCH, BAD_IDENTITY, HANDSHAKE_FAILED) are raised as the handshake
reports them, subclasses of ``RemoteProtocolError``; see spec/transport.md.

``EndOfStream`` is not an error: it says the peer half-closed a stream cleanly
(like trio's ``EndOfChannel``), and ends ``async for message in stream``.
"""

from __future__ import annotations

from biopetals.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "expected_failures",
    "TransportError",
    "ConnectionClosedError",
    "DeadlineExceeded",
    "StreamResetError",
    "UnknownProtocolError",
    "EndOfStream",
]


class TransportError(ProtocolError):
    """Base of the transport's own failures (connection, stream, deadline)."""


class ConnectionClosedError(TransportError):
    """The connection is gone (closed by either side, or failed); ``__cause__`` says why."""

    def __init__(self, message: str, code: ErrorCode | int = ErrorCode.CONNECTION_CLOSED) -> None:
        super().__init__(code, message)


class DeadlineExceeded(TransportError):
    """A call's deadline passed before it completed (code TIMEOUT)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class StreamResetError(TransportError):
    """The stream was aborted. ``code`` is what the resetting side gave (spec §3.7):
    e.g. UNKNOWN_PROTOCOL, TIMEOUT (caller gave up), INTERNAL (handler crashed) or
    any code a handler raised in a ``ProtocolError``. ``by_peer`` tells who reset it."""

    def __init__(self, code: ErrorCode | int, message: str, *, by_peer: bool = True) -> None:
        super().__init__(code, message)
        self.by_peer = by_peer


class UnknownProtocolError(StreamResetError):
    """The peer has no handler for the protocol name we opened the stream with."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNKNOWN_PROTOCOL, message)


class EndOfStream(Exception):
    """The peer half-closed the stream; no more messages will arrive (not an error)."""


def stream_reset_error(code: int, reason: str, *, by_peer: bool = True) -> StreamResetError:
    """The right subclass for a RESET carrying ``code`` and ``reason``."""
    if code == ErrorCode.UNKNOWN_PROTOCOL:
        return UnknownProtocolError(reason)
    return StreamResetError(code, reason or "stream reset", by_peer=by_peer)


def expected_failures(exc: BaseException, expected: tuple[type[BaseException], ...]) -> list[BaseException] | None:
    """What a command line reports for ``exc``: ``exc`` itself, or every exception inside it when it
    is an exception group (a Host's or a DHT's task group wraps what fails inside ``async with``),
    provided each is one of ``expected``; None if anything else is there (a bug: let it raise)."""
    leaves = _leaves(exc)
    return leaves if all(isinstance(e, expected) for e in leaves) else None


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for e in exc.exceptions for leaf in _leaves(e)]
