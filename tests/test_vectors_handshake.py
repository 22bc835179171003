"""spec/vectors/handshake.json checked both ways against protocol/handshake.py and secure_channel.py.

Valid handshakes: our parties, given the vector's fixed keys, must produce every frame exactly
(encode), and must accept the vector's frames from the other side with the stated peer ids and
handshake hash (decode). Invalid vectors must fail with exactly the stated error code, and the
receiver must send back exactly ``fields.reply`` (the Rejection, or nothing). See spec/transport.md §2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.handshake import SIGNATURE_PREFIX, Handshake, HandshakePayload, Rejection, Role
from biopetals.protocol.identity import Identity, PeerId, decode_public_key_proto, verify_signature
from biopetals.protocol.noise import CipherState
from biopetals.protocol.secure_channel import SecureChannel

DOC = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "handshake.json").read_text())
VALID = {v["name"]: v for v in DOC["valid"]}
H = bytes.fromhex


def _party(fields: dict, role: Role, expected_peer_id: PeerId | None = None) -> Handshake:
    who = "initiator" if role is Role.INITIATOR else "responder"
    return Handshake(
        role,
        Identity.from_private_bytes(H(fields[f"{who}_identity_seed"])),
        H(fields["swarm_key"]) if fields["swarm_key"] else None,
        expected_peer_id,
        static_key=H(fields[f"{who}_static"]),
        ephemeral=H(fields[f"{who}_ephemeral"]),
    )


def _frames_of(channel: SecureChannel, data: bytes) -> list[bytes]:
    channel.receive_data(data)
    out = []
    while (p := channel.next_plaintext()) is not None:
        out.append(p)
    return out


@pytest.mark.parametrize("name", ["private handshake", "public handshake"])
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_valid_handshake_both_ways(name: str, byte_by_byte: bool) -> None:
    f = VALID[name]["fields"]
    m1, m2, m3 = H(f["message1"]), H(f["message2"]), H(f["message3"])
    assert m1 + m2 + m3 == H(VALID[name]["hex"])
    init, resp = _party(f, Role.INITIATOR), _party(f, Role.RESPONDER)

    def feed(hs: Handshake, data: bytes):
        if not byte_by_byte:
            return hs.receive_data(data)
        res = None
        for i in range(len(data)):
            res = hs.receive_data(data[i : i + 1])
        return res

    assert init.data_to_send() == m1  # encode message 1
    assert feed(resp, m1) is None  # decode the vector's message 1 ...
    assert resp.data_to_send() == m2  # ... and encode message 2
    ri = feed(init, m2)
    assert init.data_to_send() == m3
    rr = feed(resp, m3)
    assert ri is not None and rr is not None
    assert str(ri.remote_peer_id) == f["responder_peer_id"]
    assert str(rr.remote_peer_id) == f["initiator_peer_id"]
    assert ri.handshake_hash.hex() == rr.handshake_hash.hex() == f["handshake_hash"]
    assert ri.protocol_name == rr.protocol_name == f["protocol_name"]
    for t in f["transport"]:
        sender, receiver = (ri, rr) if t["direction"] == "initiator->responder" else (rr, ri)
        assert sender.channel.encrypt(H(t["plaintext"])).hex() == t["frames"]
        got = _frames_of(receiver.channel, H(t["frames"])) if t["frames"] else []
        assert b"".join(got) == H(t["plaintext"])


def test_identity_payload_vector() -> None:
    v = VALID["identity payload"]
    f = v["fields"]
    p = HandshakePayload(H(f["identity_key"]), H(f["identity_sig"]))
    assert p.encode().hex() == v["hex"]
    assert HandshakePayload.decode(H(v["hex"])) == p
    assert len(H(v["hex"])) == 107
    pk = decode_public_key_proto(p.identity_key)
    assert verify_signature(pk, SIGNATURE_PREFIX + H(f["static_public"]), p.identity_sig)


@pytest.mark.parametrize("name", ["rejection: swarm key required", "rejection: swarm key unexpected"])
def test_rejection_vectors(name: str) -> None:
    v = VALID[name]
    rej = Rejection(v["fields"]["reason"], v["fields"]["protocol_id"])
    assert rej.encode().hex() == v["hex"]
    body = H(v["hex"])[2:]
    assert Rejection.is_rejection(body)
    assert Rejection.decode(body) == rej


@pytest.mark.parametrize("name", [n for n in VALID if n.startswith("secure channel")])
def test_secure_channel_vectors(name: str) -> None:
    f = VALID[name]["fields"]
    key = H(f["key"])
    interval = f["rekey_interval"]
    plaintexts = [H(p) for p in f["plaintexts"]]
    sender = SecureChannel(CipherState(key), CipherState(bytes(32)), rekey_interval=interval)
    wire = [sender.encrypt(p) for p in plaintexts]
    assert b"".join(wire).hex() == VALID[name]["hex"]
    if "frames" in f:
        assert [w.hex() for w in wire] == f["frames"]
    receiver = SecureChannel(CipherState(bytes(32)), CipherState(key), rekey_interval=interval)
    got = _frames_of(receiver, H(VALID[name]["hex"]))
    assert b"".join(got) == b"".join(plaintexts)
    assert [len(g) for g in got] == [len(x) for p in plaintexts for x in _chunks(p)]


def _chunks(p: bytes) -> list[bytes]:
    return [p[i : i + 65519] for i in range(0, len(p), 65519)]


@pytest.mark.parametrize("vector", DOC["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors(vector: dict) -> None:
    f = vector["fields"]
    base = VALID[f["base"]]["fields"]
    data = H(vector["hex"])
    expected = ErrorCode[vector["error"]]
    receiver = f["receiver"]
    if receiver == "responder":
        hs = _party(base, Role.RESPONDER)
    elif receiver == "initiator":
        expected_id = PeerId.from_base58(f["expected_peer_id"]) if "expected_peer_id" in f else None
        hs = _party(base, Role.INITIATOR, expected_id)
        assert hs.data_to_send() == H(base["message1"])
    elif receiver == "responder3":
        hs = _party(base, Role.RESPONDER)
        hs.receive_data(H(base["message1"]))
        assert hs.data_to_send() == H(base["message2"])
    else:
        assert receiver == "responder_channel"
        hs = _party(base, Role.RESPONDER)
        hs.receive_data(H(base["message1"]))
        channel = hs.receive_data(H(base["message3"])).channel
        with pytest.raises(RemoteProtocolError) as info:
            channel.receive_data(data)
            while channel.next_plaintext() is not None:
                pass
            if f.get("eof"):
                channel.receive_data(b"")
                channel.next_plaintext()
        assert info.value.code == expected, info.value
        return
    with pytest.raises(RemoteProtocolError) as info:
        hs.receive_data(data)
        if f.get("eof"):
            hs.receive_data(b"")
    assert info.value.code == expected, info.value
    if "reply" in f:
        assert hs.data_to_send().hex() == f["reply"]


def test_every_error_code_has_an_invalid_vector() -> None:
    codes = {v["error"] for v in DOC["invalid"]}
    assert {
        "SWARM_KEY_MISMATCH",
        "HANDSHAKE_FAILED",
        "BAD_IDENTITY",
        "PEER_ID_MISMATCH",
        "UNSUPPORTED_VERSION",
        "FRAME_AUTH_FAILED",
        "CONNECTION_CLOSED",
    } <= codes


def test_generator_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed file is exactly what the committed generator writes."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "generate_handshake.py"
    spec = importlib.util.spec_from_file_location("generate_handshake", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "handshake.json"
    monkeypatch.setattr(mod, "OUT", out)
    mod.main()
    assert json.loads(out.read_text()) == DOC
