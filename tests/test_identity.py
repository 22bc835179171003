"""Ed25519 identities, libp2p key protobufs and peer ids (protocol/identity.py).

Known-answer vectors come from libp2p itself, so these tests check interoperability,
not only our own round trips:

- libp2p/specs peer-ids/peer-ids.md, "Test vectors" table: the Ed25519 private key
  protobuf ``080112407e08…`` and its public key protobuf ``080112201ed1…``.
- go-libp2p p2p/http/auth/internal/handshake/handshake_test.go, TestWalkthroughInSpec
  (the walkthrough of libp2p/specs http/peer-id-auth.md): that private key's peer id
  ``12D3KooWBtg3…``, the all-zero seed's protobuf and peer id ``12D3KooWDpJ7…``, and the
  Ed25519 signatures both keys make over the walkthrough's messages.
- libp2p/specs peer-ids/peer-ids.md, "String representation": ``12D3KooWD3eck…`` as the
  example Ed25519 peer id.
"""

from __future__ import annotations

import base64

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.identity import (
    Identity,
    PeerId,
    decode_private_key_proto,
    decode_public_key_proto,
    encode_public_key_proto,
    verify_signature,
)

# libp2p/specs peer-ids.md test vectors.
SPEC_PRIVATE_PROTO = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC_PROTO = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
# go-libp2p handshake_test.go TestWalkthroughInSpec.
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
ZERO_PRIVATE_PROTO = bytes.fromhex(
    "0801124000000000000000000000000000000000000000000000000000000000000000003b6a27bcceb6a42d"
    "62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
)
ZERO_PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
# peer-ids.md "String representation" example.
SPEC_EXAMPLE_ED25519_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def _peer_id_auth_data(parts: list[bytes]) -> bytes:
    """The bytes http/peer-id-auth.md signs: prefix, then varint-length-prefixed parts."""
    out = b"libp2p-PeerID"
    for part in parts:
        assert len(part) < 128  # one-byte varints are enough for the walkthrough
        out += bytes([len(part)]) + part
    return out


# --------------------------------------------------------------------------- known answers


def test_libp2p_spec_private_key_gives_spec_public_key_and_peer_id() -> None:
    identity = Identity.from_private_key_proto(SPEC_PRIVATE_PROTO)
    assert identity.public_key_proto == SPEC_PUBLIC_PROTO
    assert identity.public_key == SPEC_PUBLIC_PROTO[4:]
    assert identity.private_key_bytes == SPEC_PRIVATE_PROTO[4:36]
    assert str(identity.peer_id) == SPEC_PEER_ID
    assert identity.peer_id.to_base58() == SPEC_PEER_ID
    assert identity.to_private_key_proto() == SPEC_PRIVATE_PROTO


def test_zero_seed_matches_go_libp2p() -> None:
    identity = Identity.from_private_bytes(bytes(32))
    assert identity.to_private_key_proto() == ZERO_PRIVATE_PROTO
    assert str(identity.peer_id) == ZERO_PEER_ID


def test_signatures_match_go_libp2p_peer_id_auth_walkthrough() -> None:
    client = Identity.from_private_key_proto(SPEC_PRIVATE_PROTO)
    server = Identity.from_private_key_proto(ZERO_PRIVATE_PROTO)
    client_data = _peer_id_auth_data(
        [b"challenge-client=" + base64.urlsafe_b64encode(bytes(32)), b'hostname="example.com"']
    )
    client_sig = client.sign(client_data)
    assert base64.urlsafe_b64encode(client_sig) == (
        b"F5OBYbbMXoIVJNWrW0UANi7rrbj4GCB6kcEceQjajLTMvC-_jpBF9MFlxiaNYXOEiPQqeo_S56YUSNinwl0ZCQ=="
    )
    server_data = _peer_id_auth_data(
        [
            b"challenge-server=BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=",
            b"client=" + SPEC_PEER_ID.encode(),
            b'hostname="example.com"',
        ]
    )
    server_sig = server.sign(server_data)
    assert base64.urlsafe_b64encode(server_sig) == (
        b"btLFqW200aDTQqpkKetJJje7V-iDknXygFqPsfiegNsboXeYDiQ6Rqcpezz1wfr8j9h83QkN9z78cAWzKzV_AQ=="
    )
    assert verify_signature(client.public_key, client_data, client_sig)
    assert verify_signature(server.public_key, server_data, server_sig)
    assert not verify_signature(server.public_key, client_data, client_sig)


def test_spec_example_peer_id_parses_and_yields_its_key() -> None:
    peer_id = PeerId.from_base58(SPEC_EXAMPLE_ED25519_ID)
    assert peer_id.multihash[:2] == b"\x00\x24"
    assert peer_id.public_key_proto == peer_id.multihash[2:]
    assert PeerId.from_public_key(peer_id.public_key) == peer_id
    assert str(peer_id) == SPEC_EXAMPLE_ED25519_ID


def test_cid_form_parses_to_same_peer_id() -> None:
    peer_id = PeerId.from_base58(SPEC_EXAMPLE_ED25519_ID)
    cid = "b" + base64.b32encode(b"\x01\x72" + peer_id.multihash).decode().lower().rstrip("=")
    assert PeerId.from_string(cid) == peer_id
    assert PeerId.from_string(SPEC_EXAMPLE_ED25519_ID) == peer_id


# --------------------------------------------------------------------------- round trips


def test_generate_sign_verify_round_trip() -> None:
    identity = Identity.generate()
    assert len(identity.private_key_bytes) == 32 and len(identity.public_key) == 32
    assert str(identity.peer_id).startswith("12D3KooW")
    assert Identity.from_private_bytes(identity.private_key_bytes) == identity
    assert Identity.from_private_key_proto(identity.to_private_key_proto()) == identity
    sig = identity.sign(b"hello")
    assert len(sig) == 64
    assert verify_signature(identity.public_key, b"hello", sig)
    assert not verify_signature(identity.public_key, b"hellO", sig)
    tampered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify_signature(identity.public_key, b"hello", tampered)
    assert not verify_signature(Identity.generate().public_key, b"hello", sig)


def test_verify_signature_never_raises_on_bad_lengths() -> None:
    identity = Identity.generate()
    sig = identity.sign(b"x")
    assert not verify_signature(identity.public_key[:31], b"x", sig)
    assert not verify_signature(identity.public_key, b"x", sig[:63])
    assert not verify_signature(identity.public_key, b"x", sig + b"\x00")
    assert not verify_signature(b"\xff" * 32, b"x", sig)  # not a valid point encoding


def test_repr_does_not_leak_secret() -> None:
    identity = Identity.from_private_key_proto(SPEC_PRIVATE_PROTO)
    assert SPEC_PRIVATE_PROTO[4:36].hex() not in repr(identity)
    assert repr(identity) == f"Identity(peer_id='{SPEC_PEER_ID}')"


def test_peer_id_bytes_round_trip_hash_and_order() -> None:
    a, b = Identity.generate().peer_id, Identity.generate().peer_id
    assert PeerId.from_bytes(a.to_bytes()) == a
    assert PeerId.from_base58(str(a)) == a
    assert PeerId.from_public_key_proto(Identity.generate().public_key_proto) != a
    table = {a: 1, b: 2}
    assert table[PeerId.from_base58(str(a))] == 1
    assert sorted([a, b]) == sorted([b, a])
    assert (a < b) == (a.multihash < b.multihash)


def test_legacy_96_byte_private_key_is_accepted() -> None:
    payload = SPEC_PRIVATE_PROTO[4:] + SPEC_PRIVATE_PROTO[36:]
    legacy = b"\x08\x01\x12\x60" + payload
    assert decode_private_key_proto(legacy) == SPEC_PRIVATE_PROTO[4:36]
    broken = b"\x08\x01\x12\x60" + SPEC_PRIVATE_PROTO[4:] + bytes(32)
    with pytest.raises(RemoteProtocolError) as exc:
        decode_private_key_proto(broken)
    assert exc.value.code == ErrorCode.BAD_IDENTITY


# --------------------------------------------------------------------------- strict decoding


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty", b"", ErrorCode.MALFORMED),
        ("type only", b"\x08\x01", ErrorCode.MALFORMED),
        ("truncated data", SPEC_PUBLIC_PROTO[:-1], ErrorCode.MALFORMED),
        ("trailing byte", SPEC_PUBLIC_PROTO + b"\x00", ErrorCode.MALFORMED),
        ("fields swapped", SPEC_PUBLIC_PROTO[2:] + b"\x08\x01", ErrorCode.MALFORMED),
        ("type as bytes", b"\x0a\x01\x01" + SPEC_PUBLIC_PROTO[2:], ErrorCode.MALFORMED),
        ("non-minimal type varint", b"\x08\x81\x00" + SPEC_PUBLIC_PROTO[2:], ErrorCode.MALFORMED),
        ("non-minimal length varint", b"\x08\x01\x12\xa0\x00" + SPEC_PUBLIC_PROTO[4:], ErrorCode.MALFORMED),
        ("unterminated varint", b"\x08\xff", ErrorCode.MALFORMED),
        ("duplicate type", b"\x08\x01" + SPEC_PUBLIC_PROTO, ErrorCode.MALFORMED),
        ("unknown field", SPEC_PUBLIC_PROTO + b"\x18\x00", ErrorCode.MALFORMED),
        ("rsa type", b"\x08\x00" + SPEC_PUBLIC_PROTO[2:], ErrorCode.BAD_IDENTITY),
        ("secp256k1 type", b"\x08\x02" + SPEC_PUBLIC_PROTO[2:], ErrorCode.BAD_IDENTITY),
        ("unknown type", b"\x08\x7f" + SPEC_PUBLIC_PROTO[2:], ErrorCode.BAD_IDENTITY),
        ("short key", b"\x08\x01\x12\x1f" + bytes(31), ErrorCode.BAD_IDENTITY),
        ("long key", b"\x08\x01\x12\x21" + bytes(33), ErrorCode.BAD_IDENTITY),
        ("oversized", b"\x08\x01\x12\x81\x01" + bytes(129), ErrorCode.LIMIT_EXCEEDED),
    ],
)
def test_decode_public_key_proto_rejects(name: str, data: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        decode_public_key_proto(data)
    assert exc.value.code == code, name


def test_decode_public_key_proto_accepts_canonical() -> None:
    assert decode_public_key_proto(SPEC_PUBLIC_PROTO) == SPEC_PUBLIC_PROTO[4:]
    assert encode_public_key_proto(SPEC_PUBLIC_PROTO[4:]) == SPEC_PUBLIC_PROTO


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("bare 32-byte seed", b"\x08\x01\x12\x20" + SPEC_PRIVATE_PROTO[4:36], ErrorCode.BAD_IDENTITY),
        ("public key does not match", SPEC_PRIVATE_PROTO[:-1] + b"\x00", ErrorCode.BAD_IDENTITY),
        ("public key protobuf given", SPEC_PUBLIC_PROTO, ErrorCode.BAD_IDENTITY),
        ("rsa type", b"\x08\x00" + SPEC_PRIVATE_PROTO[2:], ErrorCode.BAD_IDENTITY),
        ("truncated", SPEC_PRIVATE_PROTO[:40], ErrorCode.MALFORMED),
        ("trailing newline", SPEC_PRIVATE_PROTO + b"\n", ErrorCode.MALFORMED),
    ],
)
def test_private_key_proto_rejects(name: str, data: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        Identity.from_private_key_proto(data)
    assert exc.value.code == code, name


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p0",  # '0' is not base58
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq ",  # trailing space
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3p",  # one character short
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pqq",  # one too many
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha2-256 (RSA) peer id
        "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pé",
        "1" * 200,
        "bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe",  # CID: base58 only here
    ],
)
def test_from_base58_rejects_with_invalid_field(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        PeerId.from_base58(text)
    assert exc.value.code == ErrorCode.INVALID_FIELD
    assert "invalid peer id" in str(exc.value)


def test_sha256_peer_id_error_says_why() -> None:
    with pytest.raises(RemoteProtocolError, match="Ed25519 only"):
        PeerId.from_base58("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")
    with pytest.raises(RemoteProtocolError, match="libp2p-key"):
        PeerId.from_string("bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi")


@pytest.mark.parametrize(
    "mh",
    [
        b"",
        b"\x00",
        b"\x00\x24" + SPEC_PUBLIC_PROTO[:-1],  # length says 36, 35 follow
        b"\x00\x23" + SPEC_PUBLIC_PROTO,  # length says 35, 36 follow
        b"\x01\x24" + SPEC_PUBLIC_PROTO,  # unknown hash code
        b"\x12\x20" + bytes(32),  # sha2-256
        b"\x00\x24\x08\x02" + SPEC_PUBLIC_PROTO[2:],  # inlined key is not Ed25519
    ],
)
def test_peer_id_from_bytes_rejects(mh: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        PeerId.from_bytes(mh)
    assert exc.value.code == ErrorCode.INVALID_FIELD


def test_local_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Identity.from_private_bytes(b"short")
    with pytest.raises(LocalProtocolError):
        Identity.generate().sign("text")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        PeerId.from_base58(b"12D3")  # type: ignore[arg-type]
