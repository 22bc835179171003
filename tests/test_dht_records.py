"""Record signing and validation (spec/dht.md §3.3, §4), and the storage rules (§5)."""

from __future__ import annotations

import pytest

from biopetals.dht import params
from biopetals.dht.ids import block_key, key_id
from biopetals.dht.records import Record, decode_record, encode_record, sign_record, to_ms, validate
from biopetals.dht.storage import Storage
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.identity import Identity

NOW = 1_700_000_000.0
A, B, C = (Identity.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3))
KEY = block_key("aaditya/Llama3-OpenBioLLM-8B", 3)


def rec(identity: Identity, subkey: bytes, value: bytes = b"v", ttl: float = 60.0, key: str = KEY) -> Record:
    return sign_record(identity, key, subkey, value, to_ms(NOW + ttl))


def code_of(fn) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        fn()
    return info.value.code


def test_block_key() -> None:
    assert KEY == "aaditya/Llama3-OpenBioLLM-8B.3"
    assert block_key("m", 0) == "m.0"
    with pytest.raises(ValueError):
        block_key("m", -1)


def test_valid_announcement_round_trips() -> None:
    r = rec(A, A.peer_id.multihash)
    validate(r, NOW)
    assert decode_record(encode_record(r)) == r
    assert r.signer_peer_id == A.peer_id.multihash


def test_forged_peer_subkey_rejected() -> None:
    """Peer A's subkey signed by B: the signature is valid but B may not write A's slot."""
    forged = rec(B, A.peer_id.multihash)
    assert code_of(lambda: validate(forged, NOW)) == ErrorCode.BAD_SIGNATURE
    assert code_of(lambda: Storage().put(forged, NOW)) == ErrorCode.BAD_SIGNATURE


def test_expiry_window() -> None:
    r = rec(A, b"s", ttl=10)
    validate(r, NOW + 9.999)
    assert code_of(lambda: validate(r, NOW + 10)) == ErrorCode.RECORD_EXPIRED
    limit = params.MAX_TTL + params.CLOCK_SKEW
    validate(rec(A, b"s", ttl=limit), NOW)
    assert code_of(lambda: validate(rec(A, b"s", ttl=limit + 0.001), NOW)) == ErrorCode.EXPIRATION_TOO_FAR


def test_tampering_detected() -> None:
    r = rec(A, b"s")
    for changed in (
        Record(r.key + "x", r.subkey, r.value, r.expiration, r.public_key, r.signature),
        Record(r.key, b"t", r.value, r.expiration, r.public_key, r.signature),
        Record(r.key, r.subkey, b"w", r.expiration, r.public_key, r.signature),
        Record(r.key, r.subkey, r.value, r.expiration + 1, r.public_key, r.signature),
        Record(r.key, r.subkey, r.value, r.expiration, B.public_key, r.signature),
    ):
        assert code_of(lambda: validate(changed, NOW)) == ErrorCode.BAD_SIGNATURE


def test_sign_refuses_oversized() -> None:
    with pytest.raises(LocalProtocolError) as info:
        rec(A, b"s", value=b"x" * (params.MAX_VALUE_BYTES + 1))
    assert info.value.code == ErrorCode.RECORD_TOO_LARGE


# --------------------------------------------------------------------------- storage


def test_newer_expiration_replaces_older_and_stale_copy_is_ok() -> None:
    s = Storage()
    old, new = rec(A, A.peer_id.multihash, b"old", 60), rec(A, A.peer_id.multihash, b"new", 120)
    assert s.put(old, NOW) is True
    assert s.put(new, NOW) is True
    assert s.put(old, NOW) is False  # stale copy: accepted without effect
    assert [r.value for r in s.get(key_id(KEY), NOW)] == [b"new"]
    assert len(s) == 1


def test_subkeys_of_different_peers_coexist() -> None:
    s = Storage()
    for ident in (A, B, C):
        s.put(rec(ident, ident.peer_id.multihash), NOW)
    assert {r.subkey for r in s.get(key_id(KEY), NOW)} == {i.peer_id.multihash for i in (A, B, C)}


def test_open_subkey_belongs_to_first_writer_until_expiry() -> None:
    s = Storage()
    s.put(rec(A, b"config", b"a", 10), NOW)
    assert code_of(lambda: s.put(rec(B, b"config", b"b", 60), NOW)) == ErrorCode.BAD_SIGNATURE
    assert s.put(rec(A, b"config", b"a2", 60), NOW)  # the owner may replace it
    later = NOW + 61
    s.put(sign_record(B, KEY, b"config", b"b", to_ms(later + 60)), later)  # after expiry, anyone
    assert [r.value for r in s.get(key_id(KEY), later)] == [b"b"]


def test_expiry_returns_what_expired() -> None:
    s = Storage()
    short, long_ = rec(A, b"a", ttl=5), rec(B, b"b", ttl=50)
    s.put(short, NOW)
    s.put(long_, NOW)
    assert s.next_expiration() == pytest.approx(NOW + 5)
    assert s.get(key_id(KEY), NOW + 6) == [long_]  # filtered even before collection
    assert s.expire(NOW + 4) == []
    assert s.expire(NOW + 5) == [short]
    assert len(s) == 1
    assert s.expire(NOW + 50) == [long_]
    assert len(s) == 0 and s.get(key_id(KEY), NOW) == []


def test_replaced_record_does_not_expire_early() -> None:
    s = Storage()
    s.put(rec(A, b"a", b"1", ttl=5), NOW)
    s.put(rec(A, b"a", b"2", ttl=50), NOW)
    assert s.expire(NOW + 10) == []
    assert [r.value for r in s.get(key_id(KEY), NOW + 10)] == [b"2"]


def test_too_many_subkeys_and_records() -> None:
    s = Storage(max_subkeys_per_key=3, max_records=5)
    for i in range(3):
        s.put(rec(A, bytes([i])), NOW)
    assert code_of(lambda: s.put(rec(A, b"x"), NOW)) == ErrorCode.TOO_MANY_RECORDS
    s.put(rec(A, bytes([0]), ttl=100), NOW)  # replacements are always admitted
    s.put(rec(A, b"1", key="other"), NOW)
    s.put(rec(A, b"2", key="other"), NOW)
    assert code_of(lambda: s.put(rec(A, b"3", key="third"), NOW)) == ErrorCode.TOO_MANY_RECORDS
    # once records expire, room comes back without an explicit expire() call
    assert s.put(rec(A, b"3", key="third", ttl=200), NOW + 61)


def test_invalid_records_never_stored() -> None:
    s = Storage()
    bad = rec(A, b"s", ttl=-1)
    assert code_of(lambda: s.put(bad, NOW)) == ErrorCode.RECORD_EXPIRED
    far = rec(A, b"s", ttl=2 * params.MAX_TTL)
    assert code_of(lambda: s.put(far, NOW)) == ErrorCode.EXPIRATION_TOO_FAR
    assert len(s) == 0 and s.statistics().rejected == 2
