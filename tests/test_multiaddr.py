"""Multiaddr text parsing and formatting (protocol/multiaddr.py)."""

from __future__ import annotations

import argparse

import pytest

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.multiaddr import MAX_MULTIADDR_LEN, Multiaddr, MultiaddrError

# The go-libp2p walkthrough key's peer id (see tests/test_identity.py for the source).
PEER = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


@pytest.mark.parametrize(
    ("text", "kind", "host", "port", "peer"),
    [
        (f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}", "ip4", "10.0.0.5", 31337, PEER),
        ("/ip4/0.0.0.0/tcp/0", "ip4", "0.0.0.0", 0, None),
        ("/ip4/255.255.255.255/tcp/65535", "ip4", "255.255.255.255", 65535, None),
        ("/ip6/::1/tcp/4001", "ip6", "::1", 4001, None),
        (f"/ip6/2001:db8::7/tcp/443/p2p/{PEER}", "ip6", "2001:db8::7", 443, PEER),
        ("/dns/example.com/tcp/80", "dns", "example.com", 80, None),
        (f"/dns4/node-1.lab.example/tcp/31337/p2p/{PEER}", "dns4", "node-1.lab.example", 31337, PEER),
        ("/dns6/localhost/tcp/1", "dns6", "localhost", 1, None),
        ("/dns/_srv.x/tcp/1", "dns", "_srv.x", 1, None),
    ],
)
def test_parse_and_format_round_trip(text: str, kind: str, host: str, port: int, peer: str | None) -> None:
    addr = Multiaddr.parse(text)
    assert (addr.kind, addr.host, addr.port) == (kind, host, port)
    assert addr.peer_id == (PeerId.from_base58(peer) if peer else None)
    assert str(addr) == text
    assert Multiaddr.parse(str(addr)) == addr


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("/ip6/2001:DB8:0:0:0:0:0:7/tcp/1", "/ip6/2001:db8::7/tcp/1"),
        (f"/ip4/1.2.3.4/tcp/5/ipfs/{PEER}", f"/ip4/1.2.3.4/tcp/5/p2p/{PEER}"),
    ],
)
def test_non_canonical_forms_are_normalised(text: str, canonical: str) -> None:
    assert str(Multiaddr.parse(text)) == canonical


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must start with '/'"),
        ("ip4/1.2.3.4/tcp/1", "must start with '/'"),
        ("/ip4/1.2.3.4", "expected /<ip4"),
        ("/ip4/1.2.3.4/tcp/1/", "expected /<ip4"),
        ("/ip4/1.2.3.4/tcp/1/p2p", "expected /<ip4"),
        ("/ip4/1.2.3.4/udp/1", "expected 'tcp'"),
        ("/unix/x/tcp/1", "unsupported protocol 'unix'"),
        ("/ip4/1.2.3/tcp/1", "not a dotted-quad IPv4"),
        ("/ip4/01.2.3.4/tcp/1", "not a dotted-quad IPv4"),
        ("/ip4/256.1.1.1/tcp/1", "not a dotted-quad IPv4"),
        ("/ip4/::1/tcp/1", "not a dotted-quad IPv4"),
        ("/ip6/1.2.3.4/tcp/1", "not an IPv6"),
        ("/ip6/fe80::1%eth0/tcp/1", "zone ids"),
        ("/ip4/1.2.3.4/tcp/65536", "port '65536'"),
        ("/ip4/1.2.3.4/tcp/080", "port '080'"),
        ("/ip4/1.2.3.4/tcp/-1", "port '-1'"),
        ("/ip4/1.2.3.4/tcp/+1", "port '+1'"),
        ("/ip4/1.2.3.4/tcp/", "port ''"),
        ("/dns/-bad.example/tcp/1", "label '-bad'"),
        ("/dns/a..b/tcp/1", "label ''"),
        ("/dns/a b/tcp/1", "label 'a b'"),
        ("/dns//tcp/1", "1..253"),
        ("/dns/" + "a" * 64 + "/tcp/1", "label"),
        ("/dns/" + ".".join(["a" * 60] * 5) + "/tcp/1", "1..253"),
        ("/ip4/1.2.3.4/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "Ed25519 only"),
        ("/ip4/1.2.3.4/tcp/1/p2p/notapeerid0", "not base58btc"),
        (f"/ip4/1.2.3.4/tcp/1/ws/{PEER}", "expected 'p2p'"),
        ("/dns/ex\u00e4mple.com/tcp/1", "non-ASCII"),
        ("/ip4/1.2.3.4/tcp/1\n", "non-printable"),
        ("/" * (MAX_MULTIADDR_LEN + 1), "limit"),
    ],
)
def test_invalid_multiaddrs_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(MultiaddrError) as exc:
        Multiaddr.parse(text)
    assert exc.value.code == ErrorCode.INVALID_FIELD
    assert fragment in str(exc.value)
    # One class serves peer input and user input alike.
    assert isinstance(exc.value, RemoteProtocolError) and isinstance(exc.value, ValueError)


def test_with_and_without_peer_id() -> None:
    peer = Identity.generate().peer_id
    addr = Multiaddr.parse("/ip4/127.0.0.1/tcp/9000")
    pinned = addr.with_peer_id(peer)
    assert str(pinned) == f"/ip4/127.0.0.1/tcp/9000/p2p/{peer}"
    assert pinned.without_peer_id() == addr
    assert hash(pinned) == hash(Multiaddr.parse(str(pinned)))


def test_constructor_validates() -> None:
    assert Multiaddr("ip6", "0:0::1", 1).host == "::1"
    with pytest.raises(MultiaddrError):
        Multiaddr("ip4", "1.2.3.4", 70000)
    with pytest.raises(MultiaddrError):
        Multiaddr("tcp", "1.2.3.4", 1)
    with pytest.raises(MultiaddrError):
        Multiaddr("ip4", "1.2.3.4", True)  # type: ignore[arg-type]


def test_usable_as_argparse_type() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--peer", type=Multiaddr.parse)
    assert parser.parse_args(["--peer", "/ip4/1.2.3.4/tcp/5"]).peer.port == 5
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--peer", "/ip4/1.2.3.4/tcp/x"])
