"""Which of our listen addresses other peers can dial.

A node bound to a wildcard (``0.0.0.0``) must announce a concrete address instead: the first
non-loopback IPv4 address this machine's host name resolves to or, failing that, the source
address the kernel would route from (a UDP ``connect`` to a TEST-NET-1 documentation address,
which only looks up a route: no packet is sent). Operators behind NAT announce explicitly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

from biopetals.protocol.multiaddr import Multiaddr

__all__ = ["dialable_addrs", "primary_ip"]


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
