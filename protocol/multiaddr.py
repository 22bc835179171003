"""Peer addresses as multiaddr strings: ``/ip4/A/tcp/P[/p2p/ID]`` and friends.

See spec/transport.md §1.7 (rules A1-A5). Only the forms BioPetals dials are accepted:
one host component (``ip4``, ``ip6``, ``dns``, ``dns4``, ``dns6``), then ``tcp/<port>``,
then optionally ``p2p/<peer id>`` (``ipfs/<peer id>`` is read as a legacy alias and
written back as ``p2p``). Text form only; nothing here resolves names or opens sockets.

Errors are ``MultiaddrError``: a ``RemoteProtocolError`` (code INVALID_FIELD) because
addresses arrive from peers and DHT records, and also a ``ValueError`` so that code
handling user input (CLI flags, config files; ``argparse`` ``type=``) can catch the
exception it expects from a bad value.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import ErrorCode, RemoteProtocolError
from .identity import PeerId

__all__ = ["Multiaddr", "MultiaddrError", "HOST_KINDS", "MAX_MULTIADDR_LEN"]

HOST_KINDS = ("ip4", "ip6", "dns", "dns4", "dns6")
# Longest valid form: /dns6/<253-char name>/tcp/65535/p2p/<52-char id> is ~330
# characters; the limit is checked before any splitting.
MAX_MULTIADDR_LEN = 512
_MAX_DNS_NAME_LEN = 253
_DNS_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")
_PORT = re.compile(r"(?:0|[1-9][0-9]{0,4})\Z")


class MultiaddrError(RemoteProtocolError, ValueError):
    """A multiaddr that does not parse; ``.code`` is always INVALID_FIELD."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.INVALID_FIELD, message)


@dataclass(frozen=True)
class Multiaddr:
    """A dialable TCP address, optionally pinned to the peer expected there.

    ``kind`` is one of ``HOST_KINDS``; ``host`` is the address or DNS name as text
    (IPv6 in RFC 5952 compressed form, no brackets); ``port`` 0-65535 (0 only makes
    sense for a listen address: "any port"); ``peer_id`` the ``/p2p/`` component.
    Construction validates, so every instance formats back to a valid string.
    """

    kind: str
    host: str
    port: int
    peer_id: PeerId | None = None

    def __post_init__(self) -> None:
        if self.kind not in HOST_KINDS:
            raise MultiaddrError(f"unsupported address kind {self.kind!r} (one of {', '.join(HOST_KINDS)})")
        if not isinstance(self.host, str):
            raise MultiaddrError("host must be a str")
        object.__setattr__(self, "host", _check_host(self.kind, self.host))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise MultiaddrError(f"port {self.port!r} is not an integer in 0..65535")
        if self.peer_id is not None and not isinstance(self.peer_id, PeerId):
            raise MultiaddrError("peer_id must be a PeerId or None")

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        """Parse ``/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW…`` (see module docstring)."""
        if not isinstance(text, str):
            raise MultiaddrError(f"multiaddr must be a str, not {type(text).__name__}")
        if len(text) > MAX_MULTIADDR_LEN:
            raise MultiaddrError(f"multiaddr is {len(text)} characters, limit {MAX_MULTIADDR_LEN}")
        if not text.isascii() or not text.isprintable():
            raise MultiaddrError(f"multiaddr {text!r} contains non-printable or non-ASCII characters")
        if not text.startswith("/"):
            raise MultiaddrError(f"multiaddr {text!r} must start with '/'")
        parts = text[1:].split("/")
        if len(parts) not in (4, 6):
            raise MultiaddrError(
                f"multiaddr {text!r}: expected /<ip4|ip6|dns|dns4|dns6>/<host>/tcp/<port>[/p2p/<peer id>]"
            )
        kind, host, transport, port_text = parts[:4]
        if kind not in HOST_KINDS:
            raise MultiaddrError(
                f"multiaddr {text!r}: unsupported protocol {kind!r} (expected one of {', '.join(HOST_KINDS)})"
            )
        if transport != "tcp":
            raise MultiaddrError(f"multiaddr {text!r}: expected 'tcp' after the host, got {transport!r}")
        if not _PORT.match(port_text) or int(port_text) > 65535:
            raise MultiaddrError(f"multiaddr {text!r}: port {port_text!r} is not a decimal integer in 0..65535")
        peer_id = None
        if len(parts) == 6:
            proto, id_text = parts[4:]
            if proto not in ("p2p", "ipfs"):
                raise MultiaddrError(f"multiaddr {text!r}: expected 'p2p' after the port, got {proto!r}")
            try:
                peer_id = PeerId.from_base58(id_text)
            except RemoteProtocolError as exc:
                raise MultiaddrError(f"multiaddr {text!r}: {exc.message}") from None
        try:
            return cls(kind, host, int(port_text), peer_id)
        except MultiaddrError as exc:
            raise MultiaddrError(f"multiaddr {text!r}: {exc.message}") from None

    def with_peer_id(self, peer_id: PeerId | None) -> Multiaddr:
        return Multiaddr(self.kind, self.host, self.port, peer_id)

    def without_peer_id(self) -> Multiaddr:
        return Multiaddr(self.kind, self.host, self.port, None)

    def __str__(self) -> str:
        text = f"/{self.kind}/{self.host}/tcp/{self.port}"
        if self.peer_id is not None:
            text += f"/p2p/{self.peer_id}"
        return text


def _check_host(kind: str, host: str) -> str:
    """Validate ``host`` for ``kind``; return its canonical text."""
    if kind == "ip4":
        try:
            # Rejects leading zeros ("010.0.0.1") that other parsers read as octal.
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise MultiaddrError(f"{host!r} is not a dotted-quad IPv4 address") from None
    if kind == "ip6":
        if "%" in host:
            raise MultiaddrError(f"IPv6 address {host!r}: zone ids are not supported")
        try:
            return ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise MultiaddrError(f"{host!r} is not an IPv6 address") from None
    if not host or len(host) > _MAX_DNS_NAME_LEN:
        raise MultiaddrError(f"DNS name {host!r} must be 1..{_MAX_DNS_NAME_LEN} characters")
    for label in host.split("."):
        if not _DNS_LABEL.match(label):
            raise MultiaddrError(
                f"DNS name {host!r}: label {label!r} is not 1-63 letters, digits, '-' or '_' "
                "(no leading or trailing '-')"
            )
    return host
