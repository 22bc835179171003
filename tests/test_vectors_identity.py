"""spec/vectors/identity.json checked both ways: decode(hex) == fields, encode(fields) == hex.

The vectors' first entries are published libp2p values (see spec/vectors/generate_identity.py
for their sources); the rest pin our rules, including one invalid vector per rule that can be
broken, each with the exact error code.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.identity import (
    Identity,
    PeerId,
    decode_public_key_proto,
    encode_public_key_proto,
    verify_signature,
)
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.swarm_key import SwarmKey

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "spec" / "vectors" / "identity.json"
DATA = json.loads(VECTORS.read_text())


def _canonical(entry: dict) -> bytes:
    return bytes.fromhex(entry["fields"].get("canonical_hex", entry["hex"]))


def _check_private_key_proto(data: bytes, fields: dict, canonical: bytes) -> None:
    identity = Identity.from_private_key_proto(data)
    assert identity.private_key_bytes.hex() == fields["seed"]
    assert identity.public_key.hex() == fields["public_key"]
    assert identity.public_key_proto.hex() == fields["public_key_proto"]
    assert str(identity.peer_id) == fields["peer_id"]
    assert identity.peer_id.to_bytes().hex() == fields["peer_id_multihash"]
    assert Identity.from_private_bytes(bytes.fromhex(fields["seed"])).to_private_key_proto() == canonical


def _check_public_key_proto(data: bytes, fields: dict, canonical: bytes) -> None:
    assert decode_public_key_proto(data).hex() == fields["public_key"]
    assert str(PeerId.from_public_key_proto(data)) == fields["peer_id"]
    assert encode_public_key_proto(bytes.fromhex(fields["public_key"])) == canonical


def _check_peer_id_bytes(data: bytes, fields: dict, canonical: bytes) -> None:
    peer_id = PeerId.from_bytes(data)
    assert str(peer_id) == fields["peer_id"]
    assert peer_id.public_key.hex() == fields["public_key"]
    assert PeerId.from_public_key(bytes.fromhex(fields["public_key"])).to_bytes() == canonical


def _check_peer_id_base58(data: bytes, fields: dict, canonical: bytes) -> None:
    peer_id = PeerId.from_base58(data.decode("utf-8"))
    assert peer_id.to_bytes().hex() == fields["multihash"]
    assert peer_id.public_key.hex() == fields["public_key"]
    assert PeerId.from_bytes(bytes.fromhex(fields["multihash"])).to_base58().encode() == canonical


def _check_signature(data: bytes, fields: dict, canonical: bytes) -> None:
    identity = Identity.from_private_bytes(bytes.fromhex(fields["seed"]))
    message = bytes.fromhex(fields["message"])
    assert identity.public_key.hex() == fields["public_key"]
    assert identity.sign(message) == canonical  # Ed25519 signatures are deterministic
    assert verify_signature(bytes.fromhex(fields["public_key"]), message, data)
    assert not verify_signature(bytes.fromhex(fields["public_key"]), message + b"x", data)


def _check_multiaddr(data: bytes, fields: dict, canonical: bytes) -> None:
    addr = Multiaddr.parse(data.decode("utf-8"))
    assert (addr.kind, addr.host, addr.port) == (fields["kind"], fields["host"], fields["port"])
    assert (str(addr.peer_id) if addr.peer_id else None) == fields["peer_id"]
    peer = PeerId.from_base58(fields["peer_id"]) if fields["peer_id"] else None
    assert str(Multiaddr(fields["kind"], fields["host"], fields["port"], peer)).encode() == canonical


def _check_swarm_key(data: bytes, fields: dict, canonical: bytes) -> None:
    assert SwarmKey.parse(data).key.hex() == fields["key"]
    assert SwarmKey(bytes.fromhex(fields["key"])).encode() == canonical


CHECKS = {
    "private_key_proto": _check_private_key_proto,
    "public_key_proto": _check_public_key_proto,
    "peer_id_bytes": _check_peer_id_bytes,
    "peer_id_base58": _check_peer_id_base58,
    "signature": _check_signature,
    "multiaddr": _check_multiaddr,
    "swarm_key": _check_swarm_key,
}

DECODERS = {
    "private_key_proto": Identity.from_private_key_proto,
    "public_key_proto": decode_public_key_proto,
    "peer_id_bytes": PeerId.from_bytes,
    "peer_id_base58": lambda data: PeerId.from_base58(data.decode("utf-8")),
    "multiaddr": lambda data: Multiaddr.parse(data.decode("utf-8")),
    "swarm_key": SwarmKey.parse,
}


def test_header() -> None:
    assert DATA["spec"] == "spec/transport.md"
    assert DATA["revision"] == 1
    assert {e["decoder"] for e in DATA["valid"]} == set(CHECKS)
    assert {e["decoder"] for e in DATA["invalid"]} == set(DECODERS)


def test_published_libp2p_values_are_present() -> None:
    by_hex = {e["hex"]: e for e in DATA["valid"]}
    spec_key = by_hex[
        "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
        "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    ]
    assert spec_key["fields"]["peer_id"] == "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
    assert spec_key["fields"]["public_key_proto"] == (
        "080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
    )


@pytest.mark.parametrize("entry", DATA["valid"], ids=lambda e: f"{e['decoder']}:{e['name']}")
def test_valid(entry: dict) -> None:
    CHECKS[entry["decoder"]](bytes.fromhex(entry["hex"]), entry["fields"], _canonical(entry))


@pytest.mark.parametrize("entry", DATA["invalid"], ids=lambda e: f"{e['decoder']}:{e['name']}")
def test_invalid(entry: dict) -> None:
    assert entry["rule"].startswith("§")
    with pytest.raises(RemoteProtocolError) as exc:
        DECODERS[entry["decoder"]](bytes.fromhex(entry["hex"]))
    assert exc.value.code.name == entry["error"]


def test_committed_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_identity", ROOT / "spec" / "vectors" / "generate_identity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == VECTORS.read_text()
