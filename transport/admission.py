"""Admission of connections: pending handshakes and established connections, bounded.

See spec/transport.md §3.16.2. Sans-IO: the host tells this module what happened
(a socket was accepted, a handshake progressed or ended, a connection opened or
closed) and gets back decisions - refuse this socket, abort those pending
handshakes, close this connection. Nothing here touches sockets or the clock.

Pending handshakes (an accepted socket whose handshake is not finished) are
bounded per source address and in total. When a new one would exceed a bound,
the oldest pending handshake *that has not progressed* (no byte received) in that
group is evicted, else the oldest; an honest peer sends its first handshake
message at once and finishes in one round trip, so a holder of idle half-open
connections loses them to newcomers instead of locking newcomers out.

Descriptors: Linux gives a new socket the lowest free descriptor, so an accepted
socket numbered ``fd_limit - fd_headroom`` or above means fewer than
``fd_headroom`` descriptors are left: it is refused at once, and the headroom
stays free for outgoing dials and files. ``raise_descriptor_limit`` raises the
soft RLIMIT_NOFILE to the hard one (called when a host starts listening).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Hashable

__all__ = [
    "ConnectionLimits",
    "Admission",
    "raise_descriptor_limit",
    "MAX_PENDING_HANDSHAKES",
    "MAX_PENDING_PER_ADDRESS",
    "MAX_CONNECTIONS",
    "MAX_CONNECTIONS_PER_PEER",
    "FD_HEADROOM",
]

#: Default most handshakes in progress on accepted sockets, over all source addresses.
MAX_PENDING_HANDSHAKES: Final = 512
#: Default most handshakes in progress from one source IP address.
MAX_PENDING_PER_ADDRESS: Final = 64
#: Default most established inbound connections.
MAX_CONNECTIONS: Final = 1024
#: Default most established connections with one peer id (both directions; one is kept, §3.12).
MAX_CONNECTIONS_PER_PEER: Final = 4
#: Default descriptors kept free for outgoing dials and files: accepting stops short of them.
FD_HEADROOM: Final = 128


@dataclass(frozen=True)
class ConnectionLimits:
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    max_pending_per_address: int = MAX_PENDING_PER_ADDRESS
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    fd_headroom: int = FD_HEADROOM


class Admission:
    """Bookkeeping and decisions for accepted sockets and established connections.

    ``fd_limit`` is the process's descriptor limit (``raise_descriptor_limit()``), or
    None for no descriptor check.
    """

    def __init__(self, limits: ConnectionLimits, fd_limit: int | None = None) -> None:
        self.limits = limits
        self.fd_limit = fd_limit
        # key -> (address, progressed), oldest first; and per address, oldest first
        self._pending: OrderedDict[Hashable, tuple[str, bool]] = OrderedDict()
        self._by_address: dict[str, OrderedDict[Hashable, None]] = {}
        self._inbound = 0
        self._per_peer: dict[Hashable, int] = {}
        self.refused: dict[str, int] = {}  # reason -> count, since start

    # ------------------------------------------------------------------ pending handshakes

    @property
    def pending(self) -> int:
        return len(self._pending)

    def accept(self, key: Hashable, address: str, fd: int | None = None) -> tuple[str | None, list[Hashable]]:
        """A socket was accepted from ``address``: ``(refusal, evict)``.

        ``refusal`` is why this socket must be closed at once (nothing counted), or None:
        then it is counted as pending under ``key`` and the pending handshakes named in
        ``evict`` must be aborted (they are already forgotten here).
        """
        limits = self.limits
        if fd is not None and self.fd_limit is not None and fd >= self.fd_limit - limits.fd_headroom:
            return self._refuse("descriptors"), []
        evict: list[Hashable] = []
        group = self._by_address.get(address)
        if group is not None and len(group) >= limits.max_pending_per_address:
            evict.append(self._victim(list(group)))
            self.forget(evict[-1])
            self._count("pending per address")
        if len(self._pending) >= limits.max_pending_handshakes:
            evict.append(self._victim(list(self._pending)))
            self.forget(evict[-1])
            self._count("pending in total")
        self._pending[key] = (address, False)
        self._by_address.setdefault(address, OrderedDict())[key] = None
        return None, evict

    def progressed(self, key: Hashable) -> None:
        """Bytes arrived on pending handshake ``key``: it is evicted after idle ones."""
        entry = self._pending.get(key)
        if entry is not None and not entry[1]:
            self._pending[key] = (entry[0], True)

    def forget(self, key: Hashable) -> None:
        """Pending handshake ``key`` finished, failed or was evicted."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return
        group = self._by_address.get(entry[0])
        if group is not None:
            group.pop(key, None)
            if not group:
                del self._by_address[entry[0]]

    def _victim(self, keys: list[Hashable]) -> Hashable:
        """The oldest of ``keys`` (oldest first) that has not progressed, else the oldest."""
        for key in keys:
            if not self._pending[key][1]:
                return key
        return keys[0]

    # ------------------------------------------------------------------ established connections

    def open(self, peer: Hashable, *, inbound: bool) -> str | None:
        """A handshake finished with ``peer``: None to keep the connection (counted), or why to close it."""
        if self._per_peer.get(peer, 0) >= self.limits.max_connections_per_peer:
            return self._refuse("connections per peer")
        if inbound and self._inbound >= self.limits.max_connections:
            return self._refuse("connections in total")
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self._inbound += inbound
        return None

    def close(self, peer: Hashable, *, inbound: bool) -> None:
        """A connection counted by ``open`` ended."""
        left = self._per_peer.get(peer, 0) - 1
        if left > 0:
            self._per_peer[peer] = left
        else:
            self._per_peer.pop(peer, None)
        self._inbound -= inbound

    @property
    def inbound(self) -> int:
        return self._inbound

    def _refuse(self, reason: str) -> str:
        self._count(reason)
        return reason

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


def raise_descriptor_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now (None where unknown)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard or hard == resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return None if soft == resource.RLIM_INFINITY else soft
