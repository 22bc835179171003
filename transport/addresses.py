"""Which of our listen addresses other peers can dial, and which addresses we dial for others.

Dialling (spec/transport.md §3.16.5, one rule for client and node): a peer is dialled only
as a swarm member - an open connection, or an address learned from the swarm (its signed
announcement, a DHT contact that reached us over its own authenticated connection, an
earlier dial whose handshake proved it). ``dial_target`` picks what to dial for a peer
known from its announcement; ``hop_target`` is all a push hop (a Step's ``next``) yields:
the peer id, never the hop's own ``addrs``, which are neither dialled nor recorded, so a
Step cannot make a node dial anything nor rewrite a known peer's address. ``Host.connect``
keeps at most one dial in flight per peer id.

A node bound to a wildcard (``0.0.0.0``) must announce a concrete address instead: the first
non-loopback IPv4 address this machine's host name resolves to or, failing that, the source
address the kernel would route from (a UDP ``connect`` to a TEST-NET-1 documentation address,
which only looks up a route: no packet is sent). Operators behind NAT, or with a DNS name,
announce explicitly (``--announce``: :func:`announce_addrs`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from biopetals.protocol.identity import PeerId
from biopetals.protocol.multiaddr import Multiaddr, MultiaddrError

__all__ = ["announce_addrs", "dialable_addrs", "primary_ip", "dial_target", "hop_target"]


def primary_ip() -> str:
    """This machine's first non-loopback IPv4 address, or 127.0.0.1 when it has none."""
    try:
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM):
            if not sockaddr[0].startswith("127."):
                return sockaddr[0]
    except OSError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # route lookup only; UDP connect sends nothing
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def dialable_addrs(listen_addrs: Iterable[Multiaddr]) -> list[Multiaddr]:
    """Listen addresses as others can dial them: ``0.0.0.0`` becomes :func:`primary_ip`,
    an IPv6 wildcard (``::``) is left out, everything else is kept as it is."""
    out = []
    for addr in listen_addrs:
        if addr.host == "::":
            continue
        if addr.host == "0.0.0.0":
            addr = Multiaddr(addr.kind, primary_ip(), addr.port, addr.peer_id)
        out.append(addr)
    return out


def announce_addrs(announce: Iterable[str | Multiaddr], listen_addrs: Iterable[Multiaddr], peer_id: PeerId) -> list[Multiaddr]:
    """The addresses to tell other peers, each with ``/p2p/<peer_id>``: ``announce`` as given
    (a public address behind NAT, a DNS name), or, if it is empty, the dialable listen addresses.

    Raises MultiaddrError for an address that does not parse or that names another peer id.
    """
    given = [Multiaddr.parse(a) if isinstance(a, str) else a for a in announce]
    if not given:
        return [a.with_peer_id(peer_id) for a in dialable_addrs(listen_addrs)]
    for addr in given:
        if addr.peer_id is not None and addr.peer_id != peer_id:
            raise MultiaddrError(f"announced address {addr} names peer {addr.peer_id}, but this peer is {peer_id}")
    return [addr.with_peer_id(peer_id) for addr in given]


def dial_target(peer_id: str | PeerId, announced: Iterable[str]) -> str:
    """What to dial for a swarm member known from its announcement (§3.16.5): its first announced
    multiaddr that parses and names no other peer, with ``/p2p/<peer_id>``; else the bare peer id
    (then only an open connection or an address the host learned from the swarm is used)."""
    peer = str(peer_id)
    for addr in announced:
        try:
            parsed = Multiaddr.parse(addr)
        except (ValueError, MultiaddrError):
            continue
        if parsed.peer_id is None:
            return f"{parsed}/p2p/{peer}"
        if str(parsed.peer_id) == peer:
            return str(parsed)
    return peer


def hop_target(peer_id: str | PeerId) -> PeerId:
    """Whom to push to for a hop of a Step (§3.16.5): the peer id alone; the hop's ``addrs`` are ignored.

    ``Host.call(hop_target(...), ...)`` then reaches the peer over an open connection or at an
    address learned from the swarm, and fails (ConnectionClosedError) for a peer it does not know.
    Raises RemoteProtocolError for a peer id that does not parse (the decoder already checked it).
    """
    return peer_id if isinstance(peer_id, PeerId) else PeerId.from_base58(peer_id)
