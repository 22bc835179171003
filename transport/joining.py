"""Can we reach the swarm through ``--initial-peers``? A loud answer instead of a silent, lonely start.

A node or client that dials only peers refusing its swarm key, or addresses where nobody
listens, must stop with the reason and what to do, never run alone while warning in a log
(issue 24). ``diagnose`` is sans-IO: it turns the outcome of each dial into one verdict;
``dial_initial_peers`` is the thin asyncio driver (one dial per peer, in parallel, through
the host's connection pool, so the DHT then reuses the connections).

See spec/transport.md §2 for the handshake failures (SWARM_KEY_MISMATCH: the peer holds
another swarm key; PEER_ID_MISMATCH: someone else answers at that address).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Sequence

from biopetals.protocol.errors import ErrorCode, ProtocolError

from .errors import TransportError

__all__ = ["PeerOutcome", "JoinError", "diagnose", "dial_initial_peers", "require_join", "NEW_SWARM_HINT"]

NEW_SWARM_HINT = "To start a new swarm alone instead, use --new-swarm."

#: What to do about each kind of failure, by error code (others: the generic advice).
_ADVICE = {
    ErrorCode.SWARM_KEY_MISMATCH: ("refuses our swarm key", "the peer belongs to another swarm: use the key file "
                                   "of the swarm it serves (--swarm-key), or --public for a public swarm"),
    ErrorCode.PEER_ID_MISMATCH: ("answers with another peer id", "the address now belongs to another peer: copy "
                                 "the /p2p/ part again from the peer's READY line"),
    ErrorCode.TIMEOUT: ("does not answer", "check the address and port, that the peer is running, and firewalls"),
    ErrorCode.CONNECTION_CLOSED: ("is unreachable", "check the address and port, that the peer is running, and "
                                  "firewalls"),
}
_OTHER = ("failed the handshake", "check that the peer runs a compatible BioPetals")


@dataclass(frozen=True)
class PeerOutcome:
    """The result of dialing one initial peer: ``error`` None when it accepted us."""

    addr: str
    error: ProtocolError | OSError | None = None

    @property
    def code(self) -> ErrorCode | int | None:
        if self.error is None:
            return None
        return getattr(self.error, "code", ErrorCode.CONNECTION_CLOSED)

    def line(self) -> str:
        what, todo = _ADVICE.get(self.code, _OTHER)
        detail = getattr(self.error, "message", None) or str(self.error)
        name = self.code.name if isinstance(self.code, ErrorCode) else f"code {self.code}"
        return f"{self.addr} {what} ({name}: {detail}): {todo}"


class JoinError(TransportError):
    """No initial peer accepted us; ``code`` is SWARM_KEY_MISMATCH when that is why every one refused."""

    def __init__(self, code: ErrorCode | int, message: str, outcomes: Sequence[PeerOutcome]) -> None:
        super().__init__(code, message)
        self.outcomes = tuple(outcomes)


def diagnose(outcomes: Sequence[PeerOutcome], *, alone_hint: str | None) -> JoinError | None:
    """None when at least one peer accepted us; else the error to stop with (one line per peer)."""
    if not outcomes or any(o.error is None for o in outcomes):
        return None
    codes = {o.code for o in outcomes}
    code = codes.pop() if len(codes) == 1 else ErrorCode.CONNECTION_CLOSED
    if code == ErrorCode.SWARM_KEY_MISMATCH:
        head = "wrong swarm key: every initial peer refuses our swarm key (SWARM_KEY_MISMATCH)"
    else:
        head = "cannot join the swarm: no initial peer accepted us"
    lines = [head + ":", *(f"  {o.line()}" for o in outcomes)]
    if alone_hint:
        lines.append(alone_hint)
    return JoinError(code, "\n".join(lines), outcomes)


async def dial_initial_peers(host, addrs: Sequence[str], *, timeout: float) -> list[PeerOutcome]:
    """Dial every address at once (``host.connect``); never raises for a peer's failure."""

    async def one(addr: str) -> PeerOutcome:
        try:
            await host.connect(addr, timeout=timeout)
        except (ProtocolError, OSError) as e:
            return PeerOutcome(addr, e)
        return PeerOutcome(addr)

    return list(await asyncio.gather(*(one(a) for a in addrs)))


async def require_join(host, addrs: Sequence[str], *, timeout: float, alone_hint: str | None) -> None:
    """Dial ``addrs`` (none: nothing to do, a new swarm) and raise the JoinError when no peer accepts us."""
    if not addrs:
        return
    error = diagnose(await dial_initial_peers(host, addrs, timeout=timeout), alone_hint=alone_hint)
    if error is not None:
        raise error
