"""protocol/noise.py beyond the cacophony vectors: name parsing, modifiers, misuse, bad keys."""

from __future__ import annotations

import os

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.noise import PATTERNS, DecryptError, HandshakeState, KeyPair, ProtocolName


def test_pattern_table_covers_every_pattern_of_the_spec() -> None:
    one_way = {"N", "K", "X"}
    fundamental = {a + b for a in "NKXI" for b in "NKX"}
    deferred = {"NK1", "NX1", "X1N", "X1K", "XK1", "X1K1", "X1X", "XX1", "X1X1", "K1N", "K1K", "KK1", "K1K1",
                "K1X", "KX1", "K1X1", "I1N", "I1K", "IK1", "I1K1", "I1X", "IX1", "I1X1"}
    assert set(PATTERNS) == one_way | fundamental | deferred


@pytest.mark.parametrize(
    ("name", "tokens"),
    [
        ("Noise_XXpsk0_25519_ChaChaPoly_SHA256", [("psk", "e"), ("e", "ee", "s", "es"), ("s", "se")]),
        ("Noise_XXpsk3_25519_ChaChaPoly_SHA256", [("e",), ("e", "ee", "s", "es"), ("s", "se", "psk")]),
        ("Noise_NNpsk0+psk2_25519_ChaChaPoly_SHA256", [("psk", "e"), ("e", "ee", "psk")]),
    ],
)
def test_psk_modifiers(name: str, tokens: list) -> None:
    assert [m.tokens for m in ProtocolName.parse(name).pattern.messages] == tokens


@pytest.mark.parametrize(
    "name",
    [
        "Noise_XX_448_ChaChaPoly_SHA256",
        "Noise_XX_25519_AESGCM_SHA256",
        "Noise_QQ_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk9_25519_ChaChaPoly_SHA256",
        "Noise_XXbogus_25519_ChaChaPoly_SHA256",
        "Noise_XX_25519_ChaChaPoly",
    ],
)
def test_unsupported_names_are_local_errors(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        HandshakeState(name, True)


def run(proto: str, init_kw: dict, resp_kw: dict, n: int) -> tuple[HandshakeState, HandshakeState]:
    init = HandshakeState(proto, True, **init_kw)
    resp = HandshakeState(proto, False, **resp_kw)
    for i in range(n):
        sender, receiver = (init, resp) if init.is_my_turn else (resp, init)
        assert receiver.read_message(sender.write_message(b"p%d" % i)) == b"p%d" % i
    assert init.complete and resp.complete and init.handshake_hash == resp.handshake_hash
    return init, resp


def test_fallback_modifier_round_trip() -> None:
    """XXfallback (§10.2): Alice's first message becomes a pre-message; Bob writes first."""
    a_e, a_s, b_s = os.urandom(32), os.urandom(32), os.urandom(32)
    a_e_pub = KeyPair(a_e).public
    pat = ProtocolName.parse("Noise_XXfallback_25519_ChaChaPoly_SHA256").pattern
    assert pat.initiator_pre == ("e",) and not pat.messages[0].initiator_sends
    init, resp = run(
        "Noise_XXfallback+psk0_25519_ChaChaPoly_SHA256",
        {"s": a_s, "e": a_e, "psks": [b"k" * 32]},
        {"s": b_s, "re": a_e_pub, "psks": [b"k" * 32]},
        2,
    )
    i1, i2 = init.split()
    r1, r2 = resp.split()
    assert r1.decrypt_with_ad(b"", i1.encrypt_with_ad(b"", b"x")) == b"x"


def test_out_of_turn_is_a_local_error() -> None:
    init = HandshakeState("Noise_NN_25519_ChaChaPoly_SHA256", True)
    with pytest.raises(LocalProtocolError):
        init.read_message(b"")
    init.write_message(b"")
    with pytest.raises(LocalProtocolError):
        init.write_message(b"")
    with pytest.raises(LocalProtocolError):
        init.split()


def test_low_order_public_key_is_a_remote_error() -> None:
    init = HandshakeState("Noise_NN_25519_ChaChaPoly_SHA256", True)
    resp = HandshakeState("Noise_NN_25519_ChaChaPoly_SHA256", False)
    init.write_message(b"")
    resp.read_message(bytes(32))  # the all-zero point has order 1
    with pytest.raises(RemoteProtocolError) as err:
        resp.write_message(b"")
    assert err.value.code == ErrorCode.HANDSHAKE_FAILED


def test_truncated_and_tampered_messages() -> None:
    init = HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_SHA256", True, psks=[b"k" * 32])
    msg = init.write_message(b"hi")
    for bad in (msg[:10], msg[:40]):
        resp = HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_SHA256", False, psks=[b"k" * 32])
        with pytest.raises(RemoteProtocolError):
            resp.read_message(bad)
    resp = HandshakeState("Noise_NNpsk0_25519_ChaChaPoly_SHA256", False, psks=[b"j" * 32])
    with pytest.raises(DecryptError):
        resp.read_message(msg)
