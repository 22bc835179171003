"""Fuzz targets for identity, peer id, multiaddr and swarm key decoders.

Invariant (spec/transport.md §1): any input is either parsed or
raises RemoteProtocolError, and whatever parses re-encodes to something that parses to the
same value. Text decoders get bytes decoded as Latin-1, so every byte string reaches the
parser (non-ASCII must be rejected there, not by the codec).
"""

from __future__ import annotations

from biopetals.protocol.identity import (
    Identity,
    PeerId,
    decode_private_key_proto,
    decode_public_key_proto,
    encode_public_key_proto,
)
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.swarm_key import SwarmKey


def public_key_proto(data: bytes) -> None:
    key = decode_public_key_proto(data)
    # Canonical-only decoding: the accepted bytes are exactly our encoding.
    if encode_public_key_proto(key) != data:
        raise AssertionError("accepted a non-canonical PublicKey protobuf")


def private_key_proto(data: bytes) -> None:
    seed = decode_private_key_proto(data)
    identity = Identity.from_private_bytes(seed)
    if decode_private_key_proto(identity.to_private_key_proto()) != seed:
        raise AssertionError("PrivateKey protobuf does not round-trip")


def peer_id_base58(data: bytes) -> None:
    peer_id = PeerId.from_base58(data.decode("latin-1"))
    if peer_id.to_base58().encode("latin-1") != data:
        raise AssertionError("accepted a non-canonical base58 peer id")


def peer_id_bytes(data: bytes) -> None:
    peer_id = PeerId.from_bytes(data)
    if PeerId.from_public_key(peer_id.public_key) != peer_id:
        raise AssertionError("peer id does not round-trip through its public key")


def multiaddr(data: bytes) -> None:
    addr = Multiaddr.parse(data.decode("latin-1"))
    if Multiaddr.parse(str(addr)) != addr:
        raise AssertionError("multiaddr does not round-trip")


def swarm_key(data: bytes) -> None:
    key = SwarmKey.parse(data)
    if SwarmKey.parse(key.encode()) != key:
        raise AssertionError("swarm key does not round-trip")


TARGETS = {
    "identity_public_key_proto": (public_key_proto, ["identity.json"]),
    "identity_private_key_proto": (private_key_proto, ["identity.json"]),
    "identity_peer_id_base58": (peer_id_base58, ["identity.json"]),
    "identity_peer_id_bytes": (peer_id_bytes, ["identity.json"]),
    "identity_multiaddr": (multiaddr, ["identity.json"]),
    "identity_swarm_key": (swarm_key, ["identity.json"]),
}
