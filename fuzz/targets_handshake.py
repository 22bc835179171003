"""Fuzz targets for the handshake (spec/transport.md §2.3-§2.7) and the secure channel (§2.8).

Invariants (h11's): any input is either accepted or raises RemoteProtocolError, and the outcome is
the same whether the bytes arrive at once or one by one. Handshake targets add the spec's secrecy
rule: a responder whose message 1 did not authenticate sends nothing but the Rejection (§2.6), so
never its identity key. Keys are the fixed ones of spec/vectors/handshake.json, so the vectors'
frames are meaningful seeds.
"""

from __future__ import annotations

import hashlib

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.handshake import PROTOCOL_ID, Handshake, HandshakePayload, Rejection, RejectReason, Role
from biopetals.protocol.identity import Identity
from biopetals.protocol.secure_channel import SecureChannel


def _key(label: str) -> bytes:  # the same derivation as spec/vectors/generate_handshake.py
    return hashlib.sha256(b"biopetals handshake vector: " + label.encode()).digest()


_SWARM = _key("swarm key")
_RESPONDER_ID = Identity.from_private_bytes(_key("responder identity"))
_INITIATOR_ID = Identity.from_private_bytes(_key("initiator identity"))
_REJECTIONS = {Rejection(r, PROTOCOL_ID).encode() for r in RejectReason}


def _responder() -> Handshake:
    return Handshake(
        Role.RESPONDER, _RESPONDER_ID, _SWARM, static_key=_key("responder static"), ephemeral=_key("responder ephemeral")
    )


def _initiator() -> Handshake:
    return Handshake(
        Role.INITIATOR, _INITIATOR_ID, _SWARM, static_key=_key("initiator static"), ephemeral=_key("initiator ephemeral")
    )


def _feed(hs: Handshake, data: bytes, byte_by_byte: bool) -> tuple[str, bytes]:
    """Outcome (error code name or "ok"/"pending") and everything the handshake wanted to send."""
    sent = hs.data_to_send()
    try:
        chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
        for chunk in chunks:
            if chunk:
                hs.receive_data(chunk)
            sent += hs.data_to_send()
            if hs.is_done:
                break
        outcome = "ok" if hs.is_done else "pending"
    except RemoteProtocolError as exc:
        outcome = ErrorCode(exc.code).name
        sent += hs.data_to_send()
    return outcome, sent


def _both_ways(make, data: bytes) -> tuple[str, bytes]:
    whole = _feed(make(), data, False)
    split = _feed(make(), data, True)
    if whole != split:
        raise AssertionError(f"outcome differs when fed byte by byte: {whole[0]} vs {split[0]}")
    return whole


_MESSAGE2: list[bytes] = []


def _message2() -> bytes:
    """Message 2 answering the vectors' message 1: the only message 1 that authenticates without
    the swarm key's holder making a new one (the fuzzer cannot forge the PSK tag)."""
    if not _MESSAGE2:
        resp = _responder()
        resp.receive_data(_initiator().data_to_send())
        _MESSAGE2.append(resp.data_to_send())
    return _MESSAGE2[0]


def responder_message1(data: bytes) -> None:
    """Bytes from an unknown initiator to a private-swarm responder."""
    outcome, sent = _both_ways(_responder, data)
    if sent not in (b"", _message2(), *_REJECTIONS):
        raise AssertionError("the responder sent something other than nothing, message 2 or a Rejection")
    if outcome == "SWARM_KEY_MISMATCH" and sent not in _REJECTIONS:
        raise AssertionError("a rejected initiator received more than the Rejection")


def initiator_message2(data: bytes) -> None:
    """Bytes from a responder (or a man in the middle) after our message 1."""
    outcome, sent = _both_ways(_initiator, data)
    # Message 3 (our identity) only ever goes out after the responder authenticated.
    if outcome not in ("ok",) and _INITIATOR_ID.public_key in sent:
        raise AssertionError("the initiator revealed its identity to an unauthenticated responder")


def handshake_payload(data: bytes) -> None:
    p = HandshakePayload.decode(data)
    if HandshakePayload.decode(p.encode()) != p:
        raise AssertionError("payload does not round-trip")


def _channel() -> SecureChannel:
    """The responder's channel after the fixed handshake of the vectors."""
    init, resp = _initiator(), _responder()
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    result = resp.receive_data(init.data_to_send())
    assert result is not None  # fixed keys: cannot fail
    return result.channel


def _drain(ch: SecureChannel, data: bytes, step: int) -> tuple[str, bytes]:
    out = bytearray()
    try:
        for i in range(0, len(data), step):
            ch.receive_data(data[i : i + step])
            while (p := ch.next_plaintext()) is not None:
                out += p
        ch.receive_data(b"")
        while (p := ch.next_plaintext()) is not None:
            out += p
        return "ok", bytes(out)
    except RemoteProtocolError as exc:
        return ErrorCode(exc.code).name, bytes(out)


def secure_channel_receive(data: bytes) -> None:
    """Bytes arriving on an established connection (then EOF)."""
    whole = _drain(_channel(), data, max(1, len(data)))
    split = _drain(_channel(), data, 7)
    if whole != split:
        raise AssertionError(f"channel outcome differs with chunking: {whole[0]} vs {split[0]}")


TARGETS = {
    "handshake_responder_message1": (responder_message1, ["handshake.json"]),
    "handshake_initiator_message2": (initiator_message2, ["handshake.json"]),
    "handshake_payload": (handshake_payload, ["handshake.json"]),
    "secure_channel_receive": (secure_channel_receive, ["handshake.json"]),
}
