"""Generate spec/vectors/identity.json: keys, peer ids, signatures, multiaddrs, swarm keys.

Run from the repository root:  .venv/bin/python spec/vectors/generate_identity.py
(``--check`` exits 1 if the committed file differs from what would be generated).

Rules cited as "§1.2 K1" etc. are the section and rule labels of spec/transport.md §1
("Identities, key files and swarm keys"). Every entry has a ``decoder`` naming what reads
its ``hex``:

- ``private_key_proto``  libp2p PrivateKey protobuf bytes -> seed, public key, peer id
- ``public_key_proto``   libp2p PublicKey protobuf bytes -> raw public key, peer id
- ``peer_id_bytes``      multihash bytes -> peer id text
- ``peer_id_base58``     UTF-8 text of a base58btc peer id -> multihash
- ``signature``          the 64-byte signature of ``fields.message`` by ``fields.seed``
- ``multiaddr``          UTF-8 text of a multiaddr -> kind, host, port, peer id
- ``swarm_key``          swarm.key file bytes -> 32-byte key

A valid entry's ``fields.canonical_hex``, when present, is what our encoder writes
for a value that is accepted in another spelling (legacy key, upper-case hex, ...);
without it, encoding ``fields`` gives ``hex`` exactly.

The first entries are not ours: they are published libp2p values (sources below),
and this script asserts our code reproduces them before writing anything.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.identity import Identity, PeerId, decode_public_key_proto
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.swarm_key import SwarmKey

OUT = Path(__file__).with_name("identity.json")

# libp2p/specs peer-ids/peer-ids.md, "Test vectors" (Ed25519 private and public key).
SPEC_PRIVATE = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PUBLIC = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
# go-libp2p p2p/http/auth/internal/handshake/handshake_test.go, TestWalkthroughInSpec.
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"
ZERO_PRIVATE = bytes.fromhex(
    "0801124000000000000000000000000000000000000000000000000000000000000000003b6a27bcceb6a42d"
    "62a3a8d02a6f0d73653215771de243a63ac048a18b59da29"
)
ZERO_PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
WALKTHROUGH_CLIENT_MESSAGE = (
    b"libp2p-PeerID=challenge-client=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\x16hostname=\"example.com\""
)
WALKTHROUGH_CLIENT_SIG = base64.urlsafe_b64decode(
    "F5OBYbbMXoIVJNWrW0UANi7rrbj4GCB6kcEceQjajLTMvC-_jpBF9MFlxiaNYXOEiPQqeo_S56YUSNinwl0ZCQ=="
)
WALKTHROUGH_SERVER_MESSAGE = (
    b"libp2p-PeerID=challenge-server=BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=;client="
    + SPEC_PEER_ID.encode()
    + b"\x16hostname=\"example.com\""
)
WALKTHROUGH_SERVER_SIG = base64.urlsafe_b64decode(
    "btLFqW200aDTQqpkKetJJje7V-iDknXygFqPsfiegNsboXeYDiQ6Rqcpezz1wfr8j9h83QkN9z78cAWzKzV_AQ=="
)
# libp2p/specs peer-ids/peer-ids.md, "String representation": example Ed25519 peer id.
SPEC_EXAMPLE_ID = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"

SWARM_KEY = bytes(range(32))
SWARM_HEADER = b"/key/swarm/psk/1.0.0/\n"


def _identity_fields(identity: Identity) -> dict:
    return {
        "seed": identity.private_key_bytes.hex(),
        "public_key": identity.public_key.hex(),
        "public_key_proto": identity.public_key_proto.hex(),
        "peer_id": str(identity.peer_id),
        "peer_id_multihash": identity.peer_id.to_bytes().hex(),
    }


def _check_published_values() -> None:
    spec = Identity.from_private_key_proto(SPEC_PRIVATE)
    assert spec.public_key_proto == SPEC_PUBLIC
    assert str(spec.peer_id) == SPEC_PEER_ID
    zero = Identity.from_private_bytes(bytes(32))
    assert zero.to_private_key_proto() == ZERO_PRIVATE and str(zero.peer_id) == ZERO_PEER_ID
    assert spec.sign(WALKTHROUGH_CLIENT_MESSAGE) == WALKTHROUGH_CLIENT_SIG
    assert zero.sign(WALKTHROUGH_SERVER_MESSAGE) == WALKTHROUGH_SERVER_SIG


def _valid() -> list[dict]:
    spec = Identity.from_private_key_proto(SPEC_PRIVATE)
    zero = Identity.from_private_bytes(bytes(32))
    ones = Identity.from_private_bytes(b"\x01" * 32)
    v: list[dict] = []

    def add(decoder: str, name: str, data: bytes, fields: dict) -> None:
        v.append({"name": name, "decoder": decoder, "fields": fields, "hex": data.hex()})

    add("private_key_proto", "libp2p spec Ed25519 key (peer-ids.md; peer id from go-libp2p)",
        SPEC_PRIVATE, _identity_fields(spec))
    add("private_key_proto", "all-zero seed (go-libp2p http auth walkthrough)", ZERO_PRIVATE, _identity_fields(zero))
    add("private_key_proto", "seed of 0x01 bytes", ones.to_private_key_proto(), _identity_fields(ones))
    legacy = b"\x08\x01\x12\x60" + SPEC_PRIVATE[4:] + SPEC_PRIVATE[36:]
    add("private_key_proto", "legacy 96-byte form (seed || public || public) is accepted", legacy,
        {**_identity_fields(spec), "canonical_hex": SPEC_PRIVATE.hex()})

    for name, ident in [("libp2p spec Ed25519 public key", spec), ("all-zero seed's public key", zero)]:
        add("public_key_proto", name, ident.public_key_proto,
            {"public_key": ident.public_key.hex(), "peer_id": str(ident.peer_id)})

    add("peer_id_bytes", "identity multihash of the spec public key", spec.peer_id.to_bytes(),
        {"peer_id": SPEC_PEER_ID, "public_key": spec.public_key.hex()})
    example = PeerId.from_base58(SPEC_EXAMPLE_ID)
    for name, pid in [("spec key's peer id", spec.peer_id), ("peer-ids.md example", example),
                      ("all-zero seed's peer id", zero.peer_id)]:
        add("peer_id_base58", name, str(pid).encode(),
            {"multihash": pid.to_bytes().hex(), "public_key": pid.public_key.hex()})

    add("signature", "go-libp2p http auth walkthrough, client signature", WALKTHROUGH_CLIENT_SIG,
        {"seed": spec.private_key_bytes.hex(), "public_key": spec.public_key.hex(),
         "message": WALKTHROUGH_CLIENT_MESSAGE.hex()})
    add("signature", "go-libp2p http auth walkthrough, server signature (zero key)", WALKTHROUGH_SERVER_SIG,
        {"seed": zero.private_key_bytes.hex(), "public_key": zero.public_key.hex(),
         "message": WALKTHROUGH_SERVER_MESSAGE.hex()})
    add("signature", "empty message", ones.sign(b""),
        {"seed": ones.private_key_bytes.hex(), "public_key": ones.public_key.hex(), "message": ""})

    pid = SPEC_PEER_ID
    for name, text in [
        ("ip4 with peer id", f"/ip4/10.0.0.5/tcp/31337/p2p/{pid}"),
        ("ip4 listen on any port", "/ip4/0.0.0.0/tcp/0"),
        ("ip6 loopback", "/ip6/::1/tcp/4001"),
        ("ip6 with peer id", f"/ip6/2001:db8::7/tcp/443/p2p/{pid}"),
        ("dns", "/dns/example.com/tcp/80"),
        ("dns4 with peer id", f"/dns4/node-1.lab.example/tcp/31337/p2p/{pid}"),
        ("dns6", "/dns6/localhost/tcp/65535"),
        ("ipv6 written uncompressed, upper case", "/ip6/2001:DB8:0:0:0:0:0:7/tcp/1"),
        ("legacy /ipfs/ component", f"/ip4/1.2.3.4/tcp/5/ipfs/{pid}"),
    ]:
        addr = Multiaddr.parse(text)
        fields = {"kind": addr.kind, "host": addr.host, "port": addr.port,
                  "peer_id": str(addr.peer_id) if addr.peer_id else None}
        if str(addr) != text:
            fields["canonical_hex"] = str(addr).encode().hex()
        add("multiaddr", name, text.encode(), fields)

    canonical = SwarmKey(SWARM_KEY).encode()
    hex_key = SWARM_KEY.hex().encode()
    for name, data in [
        ("base16 (the form we write)", canonical),
        ("no final newline", SWARM_HEADER + b"/base16/\n" + hex_key),
        ("upper-case hex", SWARM_HEADER + b"/base16/\n" + hex_key.upper() + b"\n"),
        ("CRLF line ends", b"/key/swarm/psk/1.0.0/\r\n/base16/\r\n" + hex_key + b"\r\n"),
        ("trailing blank lines", SWARM_HEADER + b"/base16/\n" + hex_key + b"\n\n"),
        ("base64 encoding", SWARM_HEADER + b"/base64/\n" + base64.b64encode(SWARM_KEY) + b"\n"),
        ("bin encoding", SWARM_HEADER + b"/bin/\n" + SWARM_KEY),
    ]:
        fields = {"key": SWARM_KEY.hex()}
        if data != canonical:
            fields["canonical_hex"] = canonical.hex()
        add("swarm_key", name, data, fields)
    return v


def _invalid() -> list[dict]:
    pub = SPEC_PUBLIC
    priv = SPEC_PRIVATE
    hex_key = SWARM_KEY.hex().encode()
    cases: list[tuple[str, str, bytes, str]] = [
        # (decoder, name, bytes, rule)
        ("public_key_proto", "empty", b"", "§1.2 K1 both fields required"),
        ("public_key_proto", "Data missing", b"\x08\x01", "§1.2 K1 both fields required"),
        ("public_key_proto", "Data truncated", pub[:-1], "§1.2 K1 Data length within the message"),
        ("public_key_proto", "trailing byte", pub + b"\x00", "§1.2 K1 nothing after Data"),
        ("public_key_proto", "fields in wrong order", pub[2:] + pub[:2], "§1.2 K1 field 1 then field 2"),
        ("public_key_proto", "Type with wire type 2", b"\x0a\x01\x01" + pub[2:], "§1.2 K1 field 1 is a varint"),
        ("public_key_proto", "non-minimal Type varint", b"\x08\x81\x00" + pub[2:], "§1.2 K1 minimal varints"),
        ("public_key_proto", "non-minimal length varint", b"\x08\x01\x12\xa0\x00" + pub[4:], "§1.2 K1 minimal varints"),
        ("public_key_proto", "unterminated varint", b"\x08\xff", "§1.2 K1 varint within the message"),
        ("public_key_proto", "Type field twice", b"\x08\x01" + pub, "§1.2 K1 each field exactly once"),
        ("public_key_proto", "unknown field 3", pub + b"\x18\x00", "§1.2 K1 no other fields"),
        ("public_key_proto", "RSA key type", b"\x08\x00" + pub[2:], "§1.2 K1 Type is Ed25519 (1)"),
        ("public_key_proto", "Secp256k1 key (peer-ids.md vector)",
         bytes.fromhex("08021221037777e994e452c21604f91de093ce415f5432f701dd8cd1a7a6fea0e630bfca99"),
         "§1.2 K1 Type is Ed25519 (1)"),
        ("public_key_proto", "31-byte key", b"\x08\x01\x12\x1f" + bytes(31), "§1.2 K1 Data is 32 bytes"),
        ("public_key_proto", "33-byte key", b"\x08\x01\x12\x21" + bytes(33), "§1.2 K1 Data is 32 bytes"),
        ("public_key_proto", "longer than 128 bytes", b"\x08\x01\x12\x81\x01" + bytes(129), "§1.2 K1 size limit"),
        ("private_key_proto", "bare 32-byte seed", b"\x08\x01\x12\x20" + priv[4:36], "§1.2 K2 Data is 64 (or 96) bytes"),
        ("private_key_proto", "public half does not match seed", priv[:-1] + b"\x00", "§1.2 K2 public half derives from the seed"),
        ("private_key_proto", "legacy form with two different public keys",
         b"\x08\x01\x12\x60" + priv[4:] + bytes(32), "§1.2 K2 legacy public keys equal"),
        ("private_key_proto", "RSA key type", b"\x08\x00" + priv[2:], "§1.2 K2 Type is Ed25519 (1)"),
        ("private_key_proto", "truncated", priv[:40], "§1.2 K2 (K1 framing) Data length within the message"),
        ("private_key_proto", "trailing newline", priv + b"\n", "§1.2 K2 (K1 framing) nothing after Data"),
        ("peer_id_bytes", "empty", b"", "§1.3 K3 multihash code and length present"),
        ("peer_id_bytes", "length says 36, 35 follow", b"\x00\x24" + pub[:-1], "§1.3 K3 multihash length matches"),
        ("peer_id_bytes", "length says 35, 36 follow", b"\x00\x23" + pub, "§1.3 K3 multihash length matches"),
        ("peer_id_bytes", "unknown multihash code", b"\x01\x24" + pub, "§1.3 K3 identity multihash only"),
        ("peer_id_bytes", "sha2-256 multihash (RSA peer)", b"\x12\x20" + bytes(32), "§1.3 K3 identity multihash only"),
        ("peer_id_bytes", "inlined key is Secp256k1", b"\x00\x24\x08\x02" + pub[2:], "§1.3 K3 inlined key valid per K1"),
        ("peer_id_bytes", "inlined key non-canonical", b"\x00\x25\x08\x81\x00" + pub[2:], "§1.3 K3 inlined key valid per K1"),
        ("peer_id_base58", "empty", b"", "§1.3 K3 base58btc text"),
        ("peer_id_base58", "'0' is not base58", SPEC_PEER_ID[:-1].encode() + b"0", "§1.3 K3 base58btc text"),
        ("peer_id_base58", "trailing space", SPEC_PEER_ID.encode() + b" ", "§1.3 K3 canonical base58btc"),
        ("peer_id_base58", "one character short", SPEC_PEER_ID[:-1].encode(), "§1.3 K3 decodes to a valid multihash"),
        ("peer_id_base58", "sha2-256 peer id (peer-ids.md example)", b"QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
         "§1.3 K3 identity multihash only"),
        ("peer_id_base58", "CID form is not base58", b"bafzbeie5745rpv2m6tjyuugywy4d5ewrqgqqhfnf445he3omzpjbx5xqxe",
         "§1.3 K3 base58btc text"),
        ("peer_id_base58", "non-ASCII", SPEC_PEER_ID[:-1].encode() + "é".encode(), "§1.3 K3 base58btc text"),
        ("peer_id_base58", "longer than 128 characters", b"1" * 129, "§1.3 K3 size limit"),
        ("multiaddr", "no leading slash", b"ip4/1.2.3.4/tcp/1", "§1.7 A1 grammar"),
        ("multiaddr", "no port", b"/ip4/1.2.3.4", "§1.7 A1 grammar"),
        ("multiaddr", "trailing slash", b"/ip4/1.2.3.4/tcp/1/", "§1.7 A1 grammar"),
        ("multiaddr", "udp", b"/ip4/1.2.3.4/udp/1", "§1.7 A1 transport is tcp"),
        ("multiaddr", "unknown host protocol", b"/unix/x/tcp/1", "§1.7 A1 host protocols"),
        ("multiaddr", "websocket after port", b"/ip4/1.2.3.4/tcp/1/ws/" + SPEC_PEER_ID.encode(), "§1.7 A1 grammar"),
        ("multiaddr", "three-part ip4", b"/ip4/1.2.3/tcp/1", "§1.7 A2 ip4 dotted quad"),
        ("multiaddr", "ip4 leading zero", b"/ip4/01.2.3.4/tcp/1", "§1.7 A2 ip4 dotted quad"),
        ("multiaddr", "ip4 octet 256", b"/ip4/256.1.1.1/tcp/1", "§1.7 A2 ip4 dotted quad"),
        ("multiaddr", "ip6 holds ip4", b"/ip6/1.2.3.4/tcp/1", "§1.7 A2 ip6 text"),
        ("multiaddr", "ip6 zone id", b"/ip6/fe80::1%eth0/tcp/1", "§1.7 A2 no zone ids"),
        ("multiaddr", "dns label starts with '-'", b"/dns/-bad.example/tcp/1", "§1.7 A2 DNS labels"),
        ("multiaddr", "dns empty label", b"/dns/a..b/tcp/1", "§1.7 A2 DNS labels"),
        ("multiaddr", "dns label of 64 characters", b"/dns/" + b"a" * 64 + b"/tcp/1", "§1.7 A2 DNS labels"),
        ("multiaddr", "port 65536", b"/ip4/1.2.3.4/tcp/65536", "§1.7 A3 port range"),
        ("multiaddr", "port with leading zero", b"/ip4/1.2.3.4/tcp/080", "§1.7 A3 port digits"),
        ("multiaddr", "negative port", b"/ip4/1.2.3.4/tcp/-1", "§1.7 A3 port digits"),
        ("multiaddr", "sha2-256 peer id", b"/ip4/1.2.3.4/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
         "§1.7 A4 peer id per K3"),
        ("multiaddr", "non-ASCII host", "/dns/exämple.com/tcp/1".encode(), "§1.7 A5 printable ASCII"),
        ("multiaddr", "newline", b"/ip4/1.2.3.4/tcp/1\n", "§1.7 A5 printable ASCII"),
        ("multiaddr", "longer than 512 characters", b"/" * 513, "§1.7 A5 size limit"),
        ("swarm_key", "empty file", b"", "§1.6 S1 header line"),
        ("swarm_key", "header missing (hex only)", hex_key + b"\n", "§1.6 S1 header line"),
        ("swarm_key", "wrong version in header", b"/key/swarm/psk/2.0.0/\n/base16/\n" + hex_key, "§1.6 S1 header line"),
        ("swarm_key", "header only, no newline", b"/key/swarm/psk/1.0.0/", "§1.6 S1 lines end with LF"),
        ("swarm_key", "encoding line missing", SWARM_HEADER + hex_key + b"\n", "§1.6 S1 encoding line"),
        ("swarm_key", "unknown encoding", SWARM_HEADER + b"/base32/\n" + hex_key, "§1.6 S2 encodings"),
        ("swarm_key", "key missing", SWARM_HEADER + b"/base16/\n", "§1.6 S1 key line"),
        ("swarm_key", "63 hex digits", SWARM_HEADER + b"/base16/\n" + hex_key[:-1], "§1.6 S1 64 hex digits"),
        ("swarm_key", "65 hex digits", SWARM_HEADER + b"/base16/\n" + hex_key + b"0", "§1.6 S1 64 hex digits"),
        ("swarm_key", "non-hex digit", SWARM_HEADER + b"/base16/\n" + hex_key[:10] + b"g" + hex_key[11:], "§1.6 S1 64 hex digits"),
        ("swarm_key", "two keys", SWARM_HEADER + b"/base16/\n" + hex_key + b"\n" + hex_key, "§1.6 S3 nothing after the key"),
        ("swarm_key", "base64 of 31 bytes", SWARM_HEADER + b"/base64/\n" + base64.b64encode(SWARM_KEY[:31]), "§1.6 S2 key is 32 bytes"),
        ("swarm_key", "bin with trailing newline", SWARM_HEADER + b"/bin/\n" + SWARM_KEY + b"\n", "§1.6 S2 key is 32 bytes"),
        ("swarm_key", "over 1024 bytes", SWARM_HEADER + b"/base16/\n" + b"0" * 2000, "§1.6 S3 size limit"),
    ]
    out = []
    for decoder, name, data, rule in cases:
        out.append({"name": name, "decoder": decoder, "hex": data.hex(), "error": _error_of(decoder, data), "rule": rule})
    return out


def decode(decoder: str, data: bytes):
    """Run the decoder an entry names (shared with tests/test_vectors_identity.py)."""
    if decoder == "private_key_proto":
        return Identity.from_private_key_proto(data)
    if decoder == "public_key_proto":
        return decode_public_key_proto(data)
    if decoder == "peer_id_bytes":
        return PeerId.from_bytes(data)
    if decoder == "peer_id_base58":
        return PeerId.from_base58(data.decode("utf-8"))
    if decoder == "multiaddr":
        return Multiaddr.parse(data.decode("utf-8"))
    if decoder == "swarm_key":
        return SwarmKey.parse(data)
    raise KeyError(decoder)


def _error_of(decoder: str, data: bytes) -> str:
    try:
        decode(decoder, data)
    except RemoteProtocolError as exc:
        return exc.code.name
    raise AssertionError(f"{decoder}: {data!r} was accepted")


def build() -> dict:
    _check_published_values()
    return {
        "spec": "spec/transport.md",
        "revision": 1,
        "description": (
            "Identities and key files: libp2p Ed25519 PrivateKey/PublicKey protobufs, peer ids, "
            "Ed25519 signatures, multiaddrs, swarm.key files. Each entry's 'decoder' names what "
            "reads its hex (see generate_identity.py). The first vectors are published libp2p values."
        ),
        "valid": _valid(),
        "invalid": _invalid(),
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date; run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
