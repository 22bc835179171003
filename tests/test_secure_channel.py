"""The secure channel (protocol/secure_channel.py, spec/transport.md §2.8-§2.9)."""

from __future__ import annotations

import os
import random

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.noise import MAX_NONCE, CipherState
from biopetals.protocol.secure_channel import MAX_FRAME_PLAINTEXT, REKEY_INTERVAL, SecureChannel


def pair(interval: int = REKEY_INTERVAL) -> tuple[SecureChannel, SecureChannel]:
    k1, k2 = os.urandom(32), os.urandom(32)
    a = SecureChannel(CipherState(k1), CipherState(k2), rekey_interval=interval)
    b = SecureChannel(CipherState(k2), CipherState(k1), rekey_interval=interval)
    return a, b


def drain(ch: SecureChannel) -> list[bytes]:
    out = []
    while (p := ch.next_plaintext()) is not None:
        out.append(p)
    return out


@pytest.mark.parametrize(
    "size", [1, 100, MAX_FRAME_PLAINTEXT - 1, MAX_FRAME_PLAINTEXT, MAX_FRAME_PLAINTEXT + 1, 3 * MAX_FRAME_PLAINTEXT + 5]
)
def test_split_into_frames_and_back(size: int) -> None:
    a, b = pair()
    data = os.urandom(size)
    wire = a.encrypt(data)
    nframes = -(-size // MAX_FRAME_PLAINTEXT)
    assert len(wire) == size + 18 * nframes
    b.receive_data(wire)
    got = drain(b)
    assert [len(g) for g in got] == [min(MAX_FRAME_PLAINTEXT, size - i) for i in range(0, size, MAX_FRAME_PLAINTEXT)]
    assert b"".join(got) == data
    # every length prefix is within Noise's 65535
    pos = 0
    while pos < len(wire):
        n = int.from_bytes(wire[pos : pos + 2], "big")
        assert 16 < n <= 65535
        pos += 2 + n
    assert a.statistics().frames_sent == b.statistics().frames_received == nframes


def test_16_mib_in_random_chunks() -> None:
    a, b = pair()
    data = os.urandom(16 << 20)
    wire = memoryview(a.encrypt(data))
    rng = random.Random(7)
    out = bytearray()
    pos = 0
    while pos < len(wire):
        step = rng.choice([1, 2, 17, 4096, 65537, 300_000])
        b.receive_data(wire[pos : pos + step])
        pos += step
        for p in drain(b):
            out += p
    assert out == data
    assert b.statistics().buffered_bytes == 0


def test_empty_plaintext_sends_nothing_and_empty_frames_are_accepted() -> None:
    a, b = pair()
    assert a.encrypt(b"") == b""
    empty_frame = b"\x00\x10" + a._send.encrypt_with_ad(None, b"")  # a peer MAY send one
    b.receive_data(empty_frame + a.encrypt(b"x"))
    assert drain(b) == [b"", b"x"]


def test_rekey_is_deterministic_on_both_sides() -> None:
    a, b = pair(interval=3)
    key0 = a._send.key
    for i in range(10):
        b.receive_data(a.encrypt(b"m%d" % i))
        assert drain(b) == [b"m%d" % i]
    assert a._send.key != key0 and a._send.key == b._recv.key
    assert a._send.n == 10  # Rekey leaves the nonce alone


def test_rekey_actually_changes_the_key() -> None:
    """A receiver that does not rekey (another interval) fails at the first frame after the rekey."""
    k1, k2 = os.urandom(32), os.urandom(32)
    a = SecureChannel(CipherState(k1), CipherState(k2), rekey_interval=2)
    b = SecureChannel(CipherState(k2), CipherState(k1), rekey_interval=4)
    b.receive_data(a.encrypt(b"1") + a.encrypt(b"2"))
    assert drain(b) == [b"1", b"2"]
    b.receive_data(a.encrypt(b"3"))
    with pytest.raises(RemoteProtocolError) as err:
        drain(b)
    assert err.value.code == ErrorCode.FRAME_AUTH_FAILED


def test_rekey_matches_noise_definition() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    k = os.urandom(32)
    cs = CipherState(k)
    cs.rekey()
    expected = ChaCha20Poly1305(k).encrypt(b"\x00" * 4 + b"\xff" * 8, bytes(32), None)[:32]
    assert cs.key == expected


def test_tampered_frame_kills_the_channel() -> None:
    a, b = pair()
    wire = bytearray(a.encrypt(b"secret"))
    wire[-1] ^= 0x80
    b.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError) as err:
        b.next_plaintext()
    assert err.value.code == ErrorCode.FRAME_AUTH_FAILED
    with pytest.raises(LocalProtocolError):
        b.next_plaintext()
    with pytest.raises(LocalProtocolError):
        b.receive_data(b"x")


def test_replayed_frame_fails() -> None:
    a, b = pair()
    f = a.encrypt(b"once")
    b.receive_data(f + f)
    assert b.next_plaintext() == b"once"
    with pytest.raises(RemoteProtocolError):
        b.next_plaintext()


def test_eof_inside_a_frame() -> None:
    a, b = pair()
    f = a.encrypt(b"abc")
    b.receive_data(f[:-3])
    assert b.next_plaintext() is None
    b.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as err:
        b.next_plaintext()
    assert err.value.code == ErrorCode.CONNECTION_CLOSED


def test_clean_eof_is_not_an_error() -> None:
    a, b = pair()
    b.receive_data(a.encrypt(b"abc"))
    b.receive_data(b"")
    assert drain(b) == [b"abc"]
    with pytest.raises(LocalProtocolError):
        b.receive_data(b"late")


def test_nonce_exhaustion_refuses_to_encrypt() -> None:
    a, _ = pair()
    a._send.set_nonce(MAX_NONCE)
    with pytest.raises(LocalProtocolError):
        a.encrypt(b"x")


def test_unkeyed_cipher_states_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        SecureChannel(CipherState(), CipherState(os.urandom(32)))


@pytest.mark.parametrize("interval", [1, 2, 3, REKEY_INTERVAL])
def test_receive_frames_from_a_reused_buffer_equals_the_buffered_path(interval: int) -> None:
    """The connection's hot path decrypts straight out of a buffer it overwrites after each
    read; any chunking must give the plaintexts ``receive_data``/``next_plaintext`` give."""
    rnd = random.Random(interval)
    for _ in range(40):
        k1, k2 = os.urandom(32), os.urandom(32)
        a = SecureChannel(CipherState(k1), CipherState(k2), rekey_interval=interval)
        b = SecureChannel(CipherState(k2), CipherState(k1), rekey_interval=interval)
        ref_channel = SecureChannel(CipherState(k2), CipherState(k1), rekey_interval=interval)
        msgs = [os.urandom(rnd.choice([1, 5, 100, 8226, 70000])) for _ in range(rnd.randint(1, 6))]
        wire = b"".join(bytes(a.encrypt(m)) for m in msgs)
        got: list[bytes] = []
        buf = bytearray(len(wire))
        pos = 0
        while pos < len(wire):
            piece = wire[pos:pos + rnd.choice([1, 2, 3, 17, 1000, 9000, 100000])]
            pos += len(piece)
            buf[:len(piece)] = piece
            b.receive_frames(memoryview(buf)[:len(piece)], got.append)
            buf[:len(piece)] = b"\xff" * len(piece)  # the caller reuses its buffer
        ref_channel.receive_data(wire)
        assert b"".join(got) == b"".join(drain(ref_channel)) == b"".join(msgs)
        assert b.statistics().buffered_bytes == 0


def test_receive_frames_rejects_a_tampered_frame() -> None:
    a, b = pair()
    wire = bytearray(a.encrypt(b"hello"))
    wire[5] ^= 1
    with pytest.raises(RemoteProtocolError) as err:
        b.receive_frames(bytes(wire), lambda p: None)
    assert err.value.code == ErrorCode.FRAME_AUTH_FAILED
