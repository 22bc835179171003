"""Generate spec/vectors/handshake.json: the handshake and secure channel of spec/transport.md §2.

Run ``python spec/vectors/generate_handshake.py`` from the repository root; the output is
deterministic (all keys are fixed, Ed25519 signatures are deterministic). Checked both ways by
tests/test_vectors_handshake.py.

Valid vectors:
- ``private handshake`` / ``public handshake``: every frame of a complete handshake (``hex`` is
  message 1 ‖ message 2 ‖ message 3 frames, in wire order), the handshake hash, and the first
  transport frames each way.
- ``identity payload``: the msgpack payload of message 2 (§2.5).
- ``rejection ...``: the Rejection frames (§2.7).
- ``secure channel ...``: frames for given plaintexts and key (§2.8, §2.9).

Invalid vectors carry ``fields`` saying where the bytes go: ``base`` (which valid handshake supplies
keys), ``receiver`` (``responder`` at message 1, ``initiator`` at message 2, ``responder3`` at
message 3 after the base messages before it, ``responder_channel`` after the base handshake),
optional ``eof`` (the connection closes after the bytes), ``expected_peer_id`` (initiator's
expectation) and ``reply`` (what the receiver must send back, hex).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import msgpack

from biopetals.protocol.handshake import (
    NOISE_PROTOCOL_PRIVATE,
    NOISE_PROTOCOL_PUBLIC,
    PROTOCOL_ID,
    SIGNATURE_PREFIX,
    Handshake,
    HandshakePayload,
    Rejection,
    RejectReason,
    Role,
)
from biopetals.protocol.identity import Identity
from biopetals.protocol.noise import CipherState, HandshakeState, KeyPair
from biopetals.protocol.secure_channel import SecureChannel

OUT = Path(__file__).resolve().parent / "handshake.json"


def _key(label: str) -> bytes:
    return hashlib.sha256(b"biopetals handshake vector: " + label.encode()).digest()


KEYS = {
    "initiator_identity_seed": _key("initiator identity"),
    "responder_identity_seed": _key("responder identity"),
    "initiator_static": _key("initiator static"),
    "responder_static": _key("responder static"),
    "initiator_ephemeral": _key("initiator ephemeral"),
    "responder_ephemeral": _key("responder ephemeral"),
    "swarm_key": _key("swarm key"),
}
WRONG_SWARM_KEY = _key("another swarm key")
OTHER_IDENTITY_SEED = _key("someone else")


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(2, "big") + body


def parties(keyed: bool, expected_peer_id=None) -> tuple[Handshake, Handshake]:
    swarm = KEYS["swarm_key"] if keyed else None
    init = Handshake(
        Role.INITIATOR,
        Identity.from_private_bytes(KEYS["initiator_identity_seed"]),
        swarm,
        expected_peer_id,
        static_key=KEYS["initiator_static"],
        ephemeral=KEYS["initiator_ephemeral"],
    )
    resp = Handshake(
        Role.RESPONDER,
        Identity.from_private_bytes(KEYS["responder_identity_seed"]),
        swarm,
        static_key=KEYS["responder_static"],
        ephemeral=KEYS["responder_ephemeral"],
    )
    return init, resp


def run_handshake(keyed: bool):
    init, resp = parties(keyed)
    m1 = init.data_to_send()
    resp.receive_data(m1)
    m2 = resp.data_to_send()
    init.receive_data(m2)
    m3 = init.data_to_send()
    resp.receive_data(m3)
    return init, resp, m1, m2, m3


def handshake_vector(keyed: bool) -> dict:
    init, resp, m1, m2, m3 = run_handshake(keyed)
    ri, rr = init.result, resp.result
    assert ri.handshake_hash == rr.handshake_hash
    transport = []
    for direction, sender, receiver, text in (
        ("initiator->responder", ri.channel, rr.channel, b"hello from the initiator"),
        ("responder->initiator", rr.channel, ri.channel, b"hello from the responder"),
        ("initiator->responder", ri.channel, rr.channel, b""),
        ("initiator->responder", ri.channel, rr.channel, b"second frame"),
    ):
        wire = sender.encrypt(text)
        if wire:
            receiver.receive_data(wire)
            assert receiver.next_plaintext() == text
        transport.append({"direction": direction, "plaintext": text.hex(), "frames": wire.hex()})
    fields = {k: v.hex() for k, v in KEYS.items()}
    if not keyed:
        fields["swarm_key"] = None
    fields.update(
        {
            "protocol_name": NOISE_PROTOCOL_PRIVATE if keyed else NOISE_PROTOCOL_PUBLIC,
            "prologue": PROTOCOL_ID.encode().hex(),
            "initiator_peer_id": str(rr.remote_peer_id),
            "responder_peer_id": str(ri.remote_peer_id),
            "message1": m1.hex(),
            "message2": m2.hex(),
            "message3": m3.hex(),
            "handshake_hash": ri.handshake_hash.hex(),
            "transport": transport,
        }
    )
    name = "private handshake" if keyed else "public handshake"
    return {"name": name, "fields": fields, "hex": (m1 + m2 + m3).hex()}


def payload_vector() -> dict:
    ident = Identity.from_private_bytes(KEYS["responder_identity_seed"])
    static_pub = KeyPair(KEYS["responder_static"]).public
    sig = ident.sign(SIGNATURE_PREFIX + static_pub)
    p = HandshakePayload(ident.public_key_proto, sig)
    return {
        "name": "identity payload",
        "fields": {"identity_key": p.identity_key.hex(), "identity_sig": sig.hex(), "static_public": static_pub.hex()},
        "hex": p.encode().hex(),
    }


def channel_vector(name: str, plaintexts: list[bytes], rekey_interval: int, per_plaintext: bool = True) -> dict:
    key = _key("channel key " + name)
    ch = SecureChannel(CipherState(key), CipherState(_key("unused")), rekey_interval=rekey_interval)
    frames = [ch.encrypt(p) for p in plaintexts]
    fields = {"key": key.hex(), "rekey_interval": rekey_interval, "plaintexts": [p.hex() for p in plaintexts]}
    if per_plaintext:  # the frames each plaintext became (the big vector omits this copy of hex)
        fields["frames"] = [f.hex() for f in frames]
    return {"name": name, "fields": fields, "hex": b"".join(frames).hex()}


# ------------------------------------------------------------------ hand-made (invalid) messages


def _noise(keyed: bool, initiator: bool, psk: bytes | None = None) -> HandshakeState:
    who = "initiator" if initiator else "responder"
    return HandshakeState(
        NOISE_PROTOCOL_PRIVATE if keyed else NOISE_PROTOCOL_PUBLIC,
        initiator,
        prologue=PROTOCOL_ID.encode(),
        s=KEYS[f"{who}_static"],
        e=KEYS[f"{who}_ephemeral"],
        psks=[psk or KEYS["swarm_key"]] if keyed else [],
    )


def msg2_with_payload(payload: bytes) -> bytes:
    i = _noise(True, True)
    r = _noise(True, False)
    r.read_message(i.write_message(b""))
    return frame(r.write_message(payload))


def msg3_with_payload(payload: bytes) -> bytes:
    i = _noise(True, True)
    r = _noise(True, False)
    r.read_message(i.write_message(b""))
    # message 2 exactly as the base handshake sends it, so message 3 continues that transcript
    resp_payload = payload_signing(KEYS["responder_identity_seed"], KeyPair(KEYS["responder_static"]).public)
    i.read_message(r.write_message(resp_payload))
    return frame(i.write_message(payload))


def payload_signing(seed: bytes, static_pub: bytes) -> bytes:
    ident = Identity.from_private_bytes(seed)
    return HandshakePayload(ident.public_key_proto, ident.sign(SIGNATURE_PREFIX + static_pub)).encode()


def flip(data: bytes, index: int) -> bytes:
    b = bytearray(data)
    b[index] ^= 0x01
    return bytes(b)


def invalid_vectors(priv: dict, pub: dict) -> list[dict]:
    m1 = bytes.fromhex(priv["fields"]["message1"])
    m2 = bytes.fromhex(priv["fields"]["message2"])
    m3 = bytes.fromhex(priv["fields"]["message3"])
    rej1 = Rejection(RejectReason.SWARM_KEY_REQUIRED, PROTOCOL_ID).encode()
    rej2 = Rejection(RejectReason.SWARM_KEY_UNEXPECTED, PROTOCOL_ID).encode()
    wrong_psk_m1 = frame(_noise(True, True, WRONG_SWARM_KEY).write_message(b""))
    public_m1 = frame(_noise(False, True).write_message(b""))
    nonempty_m1 = frame(_noise(True, True).write_message(b"x"))
    init_ident = Identity.from_private_bytes(KEYS["initiator_identity_seed"])
    other_ident = Identity.from_private_bytes(OTHER_IDENTITY_SEED)
    init_static_pub = KeyPair(KEYS["initiator_static"]).public
    foreign_sig = HandshakePayload(init_ident.public_key_proto, other_ident.sign(SIGNATURE_PREFIX + init_static_pub))
    rsa_key_proto = b"\x08\x00\x12\x20" + bytes(32)
    sig_over_other = payload_signing(KEYS["responder_identity_seed"], KeyPair(_key("another static")).public)
    other_peer = str(Identity.from_private_bytes(OTHER_IDENTITY_SEED).peer_id)
    transport = priv["fields"]["transport"]
    f0 = bytes.fromhex(transport[0]["frames"])
    f3 = bytes.fromhex(transport[3]["frames"])

    def v(name, hexbytes, error, rule, receiver, base="private handshake", **extra):
        fields = {"base": base, "receiver": receiver, **extra}
        return {"name": name, "fields": fields, "hex": hexbytes.hex(), "error": error, "rule": rule}

    return [
        v("message 1 under another swarm key", wrong_psk_m1, "SWARM_KEY_MISMATCH",
          "§2.6 message 1 tag must verify with the responder's PSK", "responder", reply=rej1.hex()),
        v("message 1 from a peer without a swarm key", public_m1, "SWARM_KEY_MISMATCH",
          "§2.6 a private responder rejects a 32-byte (unkeyed) message 1", "responder", reply=rej1.hex()),
        v("message 1 tampered ephemeral", flip(m1, 2), "SWARM_KEY_MISMATCH",
          "§2.6 message 1 must authenticate (tampering looks like a wrong key)", "responder", reply=rej1.hex()),
        v("message 1 with a payload", nonempty_m1, "HANDSHAKE_FAILED",
          "§2.4 message 1 payload must be empty", "responder", reply=""),
        v("message 1 truncated below 32 bytes", frame(m1[2:22]), "HANDSHAKE_FAILED",
          "§2.6 message 1 shorter than an X25519 key", "responder", reply=""),
        v("message 1 frame of length 0", b"\x00\x00", "HANDSHAKE_FAILED",
          "§2.3 len must be at least 1", "responder", reply=""),
        v("message 1 frame over the limit", b"\x08\x01" + bytes(16), "HANDSHAKE_FAILED",
          "§2.3 len must be at most MAX_HANDSHAKE_MESSAGE_LEN (checked before the body)", "responder", reply=""),
        v("message 1 cut short by EOF", m1[:30], "HANDSHAKE_FAILED",
          "§2.10 the peer closed during the handshake", "responder", eof=True, reply=""),
        v("keyed message 1 to a public responder", m1, "SWARM_KEY_MISMATCH",
          "§2.6 a public responder rejects a 48-byte (keyed) message 1", "responder",
          base="public handshake", reply=rej2.hex()),
        v("public message 1 of 40 bytes", frame(bytes(40)), "HANDSHAKE_FAILED",
          "§2.6 a public message 1 is exactly 32 bytes", "responder", base="public handshake", reply=""),
        v("rejection: swarm key required", rej1, "SWARM_KEY_MISMATCH",
          "§2.7 Rejection reason 1", "initiator"),
        v("rejection: swarm key unexpected", rej2, "SWARM_KEY_MISMATCH",
          "§2.7 Rejection reason 2", "initiator"),
        v("rejection from another protocol version", Rejection(1, "/biopetals/noise/2").encode(),
          "UNSUPPORTED_VERSION", "§2.7 protocol_id differs from ours", "initiator"),
        v("rejection with an unknown reason", Rejection(9, PROTOCOL_ID).encode(), "HANDSHAKE_FAILED",
          "§2.7 unknown reason", "initiator"),
        v("malformed rejection", frame(b"biopetals/reject\x01\x30/biopetals/noise/1"), "HANDSHAKE_FAILED",
          "§2.7 id_len must match len", "initiator"),
        v("message 2 tampered payload", flip(m2, len(m2) - 1), "HANDSHAKE_FAILED",
          "§2.4 message 2 must authenticate", "initiator"),
        v("message 2 truncated", frame(m2[2:-10]), "HANDSHAKE_FAILED",
          "§2.4 message 2 must authenticate", "initiator"),
        v("message 2 signature over another static key", msg2_with_payload(sig_over_other), "BAD_IDENTITY",
          "§2.5 step 3 identity_sig must cover the sender's Noise static key", "initiator"),
        v("message 2 identity key not Ed25519",
          msg2_with_payload(HandshakePayload(rsa_key_proto, bytes(64)).encode()), "BAD_IDENTITY",
          "§2.5 step 2 identity_key must be an Ed25519 PublicKey protobuf", "initiator"),
        v("message 2 payload not msgpack", msg2_with_payload(b"\xc1"), "BAD_IDENTITY",
          "§2.5 step 1 payload must be a msgpack map", "initiator"),
        v("message 2 payload without signature",
          msg2_with_payload(msgpack.packb({0: Identity.from_private_bytes(KEYS["responder_identity_seed"]).public_key_proto})),
          "BAD_IDENTITY", "§2.5 step 1 key 1 is required", "initiator"),
        v("message 2 from an unexpected peer", m2, "PEER_ID_MISMATCH",
          "§2.5 step 4 the authenticated peer id must be the dialled one", "initiator",
          expected_peer_id=other_peer),
        v("message 3 tampered", flip(m3, 10), "HANDSHAKE_FAILED",
          "§2.4 message 3 must authenticate", "responder3"),
        v("message 3 signature made by another identity", msg3_with_payload(foreign_sig.encode()), "BAD_IDENTITY",
          "§2.5 step 3 identity_sig must verify under identity_key", "responder3"),
        v("transport frame tampered", flip(f0, 5), "FRAME_AUTH_FAILED",
          "§2.8 every frame's tag must verify", "responder_channel"),
        v("transport frame shorter than the tag", b"\x00\x0f" + bytes(15), "FRAME_AUTH_FAILED",
          "§2.8 len must be at least 16", "responder_channel"),
        v("transport frames out of order", f3, "FRAME_AUTH_FAILED",
          "§2.8 nonces are implicit: frame 1 cannot be decrypted as frame 0", "responder_channel"),
        v("transport frame cut by EOF", f0[:-1], "CONNECTION_CLOSED",
          "§2.8 a connection closed inside a frame", "responder_channel", eof=True),
    ]


def main() -> int:
    priv = handshake_vector(True)
    pub = handshake_vector(False)
    valid = [
        priv,
        pub,
        payload_vector(),
        {"name": "rejection: swarm key required", "fields": {"reason": 1, "protocol_id": PROTOCOL_ID},
         "hex": Rejection(RejectReason.SWARM_KEY_REQUIRED, PROTOCOL_ID).encode().hex()},
        {"name": "rejection: swarm key unexpected", "fields": {"reason": 2, "protocol_id": PROTOCOL_ID},
         "hex": Rejection(RejectReason.SWARM_KEY_UNEXPECTED, PROTOCOL_ID).encode().hex()},
        channel_vector("secure channel frames across rekeys", [b"a", b"bc", b"", b"def", b"ghij", b"klmno"], 2),
        channel_vector("secure channel splits a plaintext over 65519 bytes",
                       [bytes(i % 251 for i in range(65520))], 65536, per_plaintext=False),
    ]
    doc = {
        "spec": "spec/transport.md",
        "revision": 1,
        "description": (
            "BioPetals handshake (Noise_XXpsk0 / Noise_XX, §2.1-§2.7) and secure channel (§2.8-§2.9) with fixed "
            "keys. Handshake vectors: hex = message 1 || message 2 || message 3 frames in wire order. Channel "
            "vectors: hex = all frames; rekey_interval 2 is a test-only value (the protocol uses 65536). Invalid "
            "vectors: fields.base names the valid handshake supplying the keys and fields.receiver where the "
            "bytes are fed (responder: as message 1; initiator: as message 2; responder3: as message 3 after the "
            "base message 1; responder_channel: to the responder's secure channel after the base handshake); "
            "fields.reply is what the receiver must send back before closing. Generated by "
            "spec/vectors/generate_handshake.py."
        ),
        "valid": valid,
        "invalid": invalid_vectors(priv, pub),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(valid)} valid, {len(doc['invalid'])} invalid)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
