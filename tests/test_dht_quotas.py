"""DHT storage quotas and per-address routing limits (spec/dht.md §5.4, §8.1), sans-IO.

What issue 21 measured: 64 free identities filled every subkey of a block key, and
150 identities made most FIND_NODE answers fake. Here one host's identities (one
source address) store at most ``MAX_WRITERS_PER_ADDRESS`` writers' records, so a new
node from another address still announces under the same key; an announcement is
taken only from its own signer; routing-table entries per address are bounded.
"""

from __future__ import annotations

import random

import pytest

from biopetals.dht import params
from biopetals.dht.handler import RequestHandler
from biopetals.dht.ids import block_key, key_id, node_id
from biopetals.dht.messages import Contact, FindNodeRequest, FindNodeResponse, PingRequest, StoreRequest, StoreResponse
from biopetals.dht.records import sign_record, to_ms
from biopetals.dht.routing import RoutingTable
from biopetals.dht.storage import Storage
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.identity import Identity

NOW = 1_700_000_000.0
KEY = block_key("m", 0)
RNG = random.Random(21)


def identity() -> Identity:
    return Identity.from_private_bytes(RNG.randbytes(32))


def announce(who: Identity, key: str = KEY):
    return sign_record(who, key, who.peer_id.multihash, b"serving", to_ms(NOW + 600))


def store(handler: RequestHandler, who: Identity, address: str, record=None) -> int:
    record = record or announce(who)
    response, _ = handler.handle(who.peer_id.multihash, StoreRequest((record,), ()), NOW, address)
    assert isinstance(response, StoreResponse)
    return response.statuses[0]


def test_one_hosts_identities_cannot_keep_a_new_nodes_announcement_out() -> None:
    for attackers in (64, 1000):
        handler = RequestHandler(RoutingTable(b"\0" * 34), Storage())
        statuses = [store(handler, identity(), "10.0.0.66") for _ in range(attackers)]
        assert statuses.count(0) == params.MAX_WRITERS_PER_ADDRESS
        assert set(statuses[params.MAX_WRITERS_PER_ADDRESS :]) == {ErrorCode.TOO_MANY_RECORDS}
        # A new node on another host announces under the same block key: accepted.
        assert store(handler, identity(), "10.0.0.7") == 0
        assert len(handler.storage.get(key_id(KEY), NOW)) == params.MAX_WRITERS_PER_ADDRESS + 1


def test_an_announcement_is_taken_only_from_its_signer() -> None:
    handler = RequestHandler(RoutingTable(b"\0" * 34), Storage())
    owner, relay = identity(), identity()
    # relay sends owner's (validly signed) announcement: refused, it is owner's to send.
    response, _ = handler.handle(relay.peer_id.multihash, StoreRequest((announce(owner),), ()), NOW, "10.0.0.1")
    assert response == StoreResponse((ErrorCode.BAD_SIGNATURE,))
    assert store(handler, owner, "10.0.0.2") == 0
    # Our own records (no sender) are exempt from the sender rules.
    assert Storage().put(announce(owner), NOW)


def test_writer_and_sender_quotas() -> None:
    storage = Storage(max_records_per_writer=3, max_records_per_sender=4, max_writers_per_address=8)
    a, b = identity(), identity()
    sa, sb = a.peer_id.multihash, b.peer_id.multihash
    for i in range(3):
        assert storage.put(announce(a, block_key("m", i)), NOW, sender=sa, address="h1")
    with pytest.raises(RemoteProtocolError) as info:
        storage.put(announce(a, block_key("m", 3)), NOW, sender=sa, address="h1")
    assert info.value.code == ErrorCode.TOO_MANY_RECORDS and "writer" in info.value.message
    # Open subkeys: b sends records signed by others; the sender quota counts them all.
    for i in range(4):
        record = sign_record(identity(), block_key("n", i), b"open", b"v", to_ms(NOW + 60))
        assert storage.put(record, NOW, sender=sb, address="h2")
    record = sign_record(identity(), block_key("n", 9), b"open", b"v", to_ms(NOW + 60))
    with pytest.raises(RemoteProtocolError) as info:
        storage.put(record, NOW, sender=sb, address="h2")
    assert info.value.code == ErrorCode.TOO_MANY_RECORDS and "sender" in info.value.message
    # Expiry gives the quotas back.
    later = NOW + 3600
    storage.expire(later)
    assert len(storage) == 0
    fresh = sign_record(a, block_key("m", 5), sa, b"serving", to_ms(later + 60))
    assert storage.put(fresh, later, sender=sa, address="h1")


def test_routing_table_holds_a_bounded_number_of_contacts_per_address() -> None:
    handler = RequestHandler(RoutingTable(b"\0" * 34), Storage())
    for _ in range(150):
        who = identity()
        handler.handle(who.peer_id.multihash, PingRequest(("/ip4/10.0.0.66/tcp/1",)), NOW, "10.0.0.66")
    honest = [identity() for _ in range(20)]
    for k, who in enumerate(honest):
        handler.handle(who.peer_id.multihash, PingRequest((f"/ip4/10.1.0.{k}/tcp/1",)), NOW, f"10.1.0.{k}")
    table = handler.table
    assert len(table) == params.MAX_CONTACTS_PER_ADDRESS + 20 and table.refused == 150 - params.MAX_CONTACTS_PER_ADDRESS
    asker = identity()
    response, _ = handler.handle(asker.peer_id.multihash, FindNodeRequest(node_id(asker.peer_id.multihash), ()), NOW, "10.2.0.1")
    assert isinstance(response, FindNodeResponse)
    fake = sum(c.addrs[0].startswith("/ip4/10.0.0.66/") for c in response.contacts)
    assert fake <= params.MAX_CONTACTS_PER_ADDRESS < len(response.contacts)
    # A removed contact frees its address's place.
    victim = next(c for c in table.contacts() if c.addrs[0].startswith("/ip4/10.0.0.66/"))
    table.remove(victim.peer_id)
    refused = table.refused
    newcomer = identity()
    table.add_or_update(Contact(newcomer.peer_id.multihash, ("/ip4/10.0.0.66/tcp/2",)), NOW, "10.0.0.66")
    assert table.refused == refused  # counted, not refused: the address had a free place again
