"""Node ids, key ids and the XOR metric of the DHT.

See spec/dht.md §1. Ids are 32-byte strings; distances are Python ints so that
they compare and sort directly.
"""

from __future__ import annotations

import hashlib

ID_BYTES = 32
ID_BITS = 8 * ID_BYTES

#: The first six bytes of every binary Ed25519 peer id: identity multihash of a
#: 36-byte libp2p PublicKey protobuf (spec/dht.md §3.1, spec/transport.md).
ED25519_PEER_ID_PREFIX = bytes.fromhex("002408011220")
PEER_ID_BYTES = len(ED25519_PEER_ID_PREFIX) + 32


def node_id(peer_id_multihash: bytes) -> bytes:
    """SHA-256 of the binary peer id (spec/dht.md §1.1)."""
    return hashlib.sha256(peer_id_multihash).digest()


def key_id(key: str) -> bytes:
    """SHA-256 of the key's UTF-8 bytes (spec/dht.md §1.2)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def distance(a: bytes, b: bytes) -> int:
    """XOR distance as a 256-bit unsigned integer (spec/dht.md §1.3)."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(own: bytes, other: bytes) -> int:
    """Leading bits ``own`` and ``other`` share: 0..255 (spec/dht.md §1.4). Ids must differ."""
    d = distance(own, other)
    if d == 0:
        raise ValueError("a node has no bucket for its own id")
    return ID_BITS - d.bit_length()


def random_id_in_bucket(own: bytes, index: int, random_bytes: bytes) -> bytes:
    """An id in bucket ``index`` of ``own``, built from 32 caller-supplied random bytes.

    Sans-IO: the caller supplies the randomness (``os.urandom(32)`` or a seeded RNG).
    """
    if not 0 <= index < ID_BITS or len(random_bytes) != ID_BYTES:
        raise ValueError("bad bucket index or random bytes")
    own_int = int.from_bytes(own, "big")
    rand = int.from_bytes(random_bytes, "big")
    flip_bit = ID_BITS - 1 - index  # first differing bit
    high_mask = ((1 << ID_BITS) - 1) ^ ((1 << (flip_bit + 1)) - 1)
    low_mask = (1 << flip_bit) - 1
    value = (own_int & high_mask) | ((~own_int) & (1 << flip_bit)) | (rand & low_mask)
    return value.to_bytes(ID_BYTES, "big")


def is_peer_id_subkey(subkey: bytes) -> bool:
    """True when a subkey has the form of a binary Ed25519 peer id (spec/dht.md §4 rule 4.6)."""
    return len(subkey) == PEER_ID_BYTES and subkey.startswith(ED25519_PEER_ID_PREFIX)


def peer_id_of_public_key(public_key: bytes) -> bytes:
    """Binary Ed25519 peer id of a raw 32-byte public key."""
    return ED25519_PEER_ID_PREFIX + public_key


def block_key(model_name: str, index: int) -> str:
    """The DHT key announcing block ``index`` of ``model_name`` (spec/dht.md §6)."""
    if index < 0:
        raise ValueError("block index must be >= 0")
    return f"{model_name}.{int(index)}"
