"""Which listen addresses are announced: wildcards replaced, loopback kept."""

from biopetals.protocol.identity import Identity
from biopetals.protocol.multiaddr import Multiaddr
import pytest

from biopetals.protocol.multiaddr import MultiaddrError
from biopetals.transport.addresses import announce_addrs, dialable_addrs, primary_ip


def test_wildcard_becomes_a_concrete_address_and_peer_id_is_kept():
    peer = Identity.generate().peer_id
    out = dialable_addrs([Multiaddr.parse(f"/ip4/0.0.0.0/tcp/31337/p2p/{peer}")])
    assert len(out) == 1
    assert out[0].host == primary_ip() and out[0].host != "0.0.0.0"
    assert out[0].port == 31337 and out[0].peer_id == peer


def test_ipv6_wildcard_dropped_and_concrete_addresses_kept():
    addrs = [Multiaddr.parse("/ip6/::/tcp/1"), Multiaddr.parse("/ip4/127.0.0.1/tcp/2"), Multiaddr.parse("/dns/x.org/tcp/3")]
    assert [str(a) for a in dialable_addrs(addrs)] == ["/ip4/127.0.0.1/tcp/2", "/dns/x.org/tcp/3"]


def test_announced_addresses_replace_the_listen_addresses_and_carry_our_peer_id():
    me, other = Identity.generate().peer_id, Identity.generate().peer_id
    listen = [Multiaddr.parse(f"/ip4/127.0.0.1/tcp/4001/p2p/{me}")]
    assert [str(a) for a in announce_addrs([], listen, me)] == [f"/ip4/127.0.0.1/tcp/4001/p2p/{me}"]
    given = ["/ip4/203.0.113.7/tcp/31337", f"/dns4/node1.lab.example/tcp/31337/p2p/{me}"]
    assert [str(a) for a in announce_addrs(given, listen, me)] == [
        f"/ip4/203.0.113.7/tcp/31337/p2p/{me}",
        f"/dns4/node1.lab.example/tcp/31337/p2p/{me}",
    ]
    with pytest.raises(MultiaddrError, match=str(other)):
        announce_addrs([f"/ip4/203.0.113.7/tcp/31337/p2p/{other}"], listen, me)
    with pytest.raises(MultiaddrError):
        announce_addrs(["/ip4/203.0.113.7/udp/31337"], listen, me)


def test_dial_rule_uses_announced_addresses_and_never_a_hops():
    """spec/transport.md §3.16.5: announced addresses (with /p2p/ added), none naming another peer; a hop is its peer id."""
    from biopetals.transport.addresses import dial_target, hop_target

    me, other = Identity.generate().peer_id, Identity.generate().peer_id
    assert dial_target(me, ["not a multiaddr", f"/ip4/10.0.0.2/tcp/1/p2p/{other}", "/ip4/10.0.0.1/tcp/2"]) == f"/ip4/10.0.0.1/tcp/2/p2p/{me}"
    assert dial_target(str(me), [f"/dns4/n.example/tcp/3/p2p/{me}"]) == f"/dns4/n.example/tcp/3/p2p/{me}"
    assert dial_target(me, []) == str(me)  # only an open connection or a learned address then
    assert hop_target(str(me)) == me and hop_target(me) is me
