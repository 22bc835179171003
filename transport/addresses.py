"""Which of our listen addresses other peers can dial.

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

__all__ = ["announce_addrs", "dialable_addrs", "primary_ip"]


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
