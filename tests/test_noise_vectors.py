"""Every cacophony Noise vector (25519/ChaChaPoly/SHA256) against biopetals.protocol.noise.

The file lives in spec/vectors/noise/ (a copy; see the README there); ../shared/vectors/noise/ is
accepted too. For each vector both parties are run: every handshake message must equal the
vector's ciphertext byte for byte and decrypt to its payload, the handshake hash must match, and
the transport messages after Split() must match as well (one-way patterns: initiator to
responder only; interactive ones: alternating, initiator first).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biopetals.protocol.noise import DecryptError, HandshakeState

ROOT = Path(__file__).resolve().parents[1]
_NAME = "cacophony-25519-chachapoly-sha256.json"
_CANDIDATES = [ROOT / "spec" / "vectors" / "noise" / _NAME, ROOT.parent / "shared" / "vectors" / "noise" / _NAME]
EXPECTED_COUNT = 59


def _load() -> list[dict]:
    for path in _CANDIDATES:
        if path.exists():
            return json.loads(path.read_text())["vectors"]
    raise FileNotFoundError(f"{_NAME} not found in {_CANDIDATES}")


VECTORS = _load()


def _hx(v: dict, key: str) -> bytes | None:
    return bytes.fromhex(v[key]) if key in v else None


def _party(v: dict, who: str, initiator: bool) -> HandshakeState:
    return HandshakeState(
        v["protocol_name"],
        initiator,
        prologue=_hx(v, f"{who}_prologue") or b"",
        s=_hx(v, f"{who}_static"),
        e=_hx(v, f"{who}_ephemeral"),
        rs=_hx(v, f"{who}_remote_static"),
        re=_hx(v, f"{who}_remote_ephemeral"),
        psks=[bytes.fromhex(p) for p in v.get(f"{who}_psks", [])],
    )


def _name(v: dict) -> str:
    return v["protocol_name"]


def _run_vector(vector: dict) -> None:
    init = _party(vector, "init", True)
    resp = _party(vector, "resp", False)
    n_hs = len(init.protocol.pattern.messages)
    msgs = vector["messages"]
    assert len(msgs) > n_hs
    for i, m in enumerate(msgs[:n_hs]):
        sender, receiver = (init, resp) if init.is_my_turn else (resp, init)
        assert receiver.is_my_turn is False
        ct = sender.write_message(bytes.fromhex(m["payload"]))
        assert ct.hex() == m["ciphertext"], f"handshake message {i}"
        assert receiver.read_message(ct).hex() == m["payload"]
    assert init.complete and resp.complete
    assert init.handshake_hash.hex() == vector["handshake_hash"]
    assert resp.handshake_hash.hex() == vector["handshake_hash"]

    i_send, i_recv = init.split()
    r_recv, r_send = resp.split()
    one_way = init.protocol.pattern.one_way
    for j, m in enumerate(msgs[n_hs:]):
        from_initiator = one_way or (n_hs + j) % 2 == 0
        enc, dec = (i_send, r_recv) if from_initiator else (r_send, i_recv)
        ct = enc.encrypt_with_ad(b"", bytes.fromhex(m["payload"]))
        assert ct.hex() == m["ciphertext"], f"transport message {j}"
        assert dec.decrypt_with_ad(b"", ct).hex() == m["payload"]


@pytest.mark.parametrize("vector", VECTORS, ids=_name)
def test_cacophony_vector(vector: dict) -> None:
    _run_vector(vector)


def test_all_59_vectors_run_and_pass() -> None:
    """Independent of selection and order: runs every vector once more and counts them."""
    ran = 0
    for v in VECTORS:
        _run_vector(v)
        ran += 1
    assert ran == EXPECTED_COUNT == len({_name(v) for v in VECTORS})


def test_tampered_vector_message_fails() -> None:
    """The checks above can fail: a flipped ciphertext bit is rejected with DecryptError."""
    v = next(x for x in VECTORS if x["protocol_name"].startswith("Noise_XXpsk3_"))
    init, resp = _party(v, "init", True), _party(v, "resp", False)
    m1 = bytearray(init.write_message(b""))
    resp.read_message(bytes(m1))
    m2 = bytearray(resp.write_message(b"hello"))
    m2[-1] ^= 1
    with pytest.raises(DecryptError):
        init.read_message(bytes(m2))
