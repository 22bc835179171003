"""Which listen addresses are announced: wildcards replaced, loopback kept."""

from biopetals.protocol.identity import Identity
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.transport.addresses import dialable_addrs, primary_ip


def test_wildcard_becomes_a_concrete_address_and_peer_id_is_kept():
    peer = Identity.generate().peer_id
    out = dialable_addrs([Multiaddr.parse(f"/ip4/0.0.0.0/tcp/31337/p2p/{peer}")])
    assert len(out) == 1
    assert out[0].host == primary_ip() and out[0].host != "0.0.0.0"
    assert out[0].port == 31337 and out[0].peer_id == peer


def test_ipv6_wildcard_dropped_and_concrete_addresses_kept():
    addrs = [Multiaddr.parse("/ip6/::/tcp/1"), Multiaddr.parse("/ip4/127.0.0.1/tcp/2"), Multiaddr.parse("/dns/x.org/tcp/3")]
    assert [str(a) for a in dialable_addrs(addrs)] == ["/ip4/127.0.0.1/tcp/2", "/dns/x.org/tcp/3"]
