"""Signed, expiring DHT records: the dataclass, its codec, signing and validation.

See spec/dht.md §3.2 (fields), §3.3 (what is signed) and §4 (validity rules).
Decoding (``record_from_obj``/``decode_record``) checks rules 4.1 and 4.2 with the
record's declarative field table (``_RecordTable``) and raises only RemoteProtocolError; ``validate`` checks the rules that need the
clock and the signature (4.3 to 4.6). Time is an argument, never read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.identity import Identity, verify_signature
from biopetals.protocol.table import Blob, Text, UInt, Violation, WireStruct, wire

from . import params
from .codec import unpack
from .ids import is_peer_id_subkey, key_id, peer_id_of_public_key

SIGNATURE_DOMAIN = b"biopetals/dht/record/1\n"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


@dataclass(frozen=True, slots=True)
class Record:
    """One signed value under (key, subkey). ``expiration`` is integer ms since the epoch."""

    key: str
    subkey: bytes
    value: bytes
    expiration: int
    public_key: bytes
    signature: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.key)

    @property
    def signer_peer_id(self) -> bytes:
        """Binary peer id of the signer."""
        return peer_id_of_public_key(self.public_key)

    @property
    def expiration_seconds(self) -> float:
        return self.expiration / 1000.0


def to_ms(seconds: float) -> int:
    """Unix seconds (float) to the integer milliseconds the wire carries."""
    return math.floor(seconds * 1000)


def signed_payload(key: str, subkey: bytes, value: bytes, expiration: int) -> bytes:
    """The bytes a record's signature covers (spec/dht.md §3.3)."""
    body = {0: key, 1: bytes(subkey), 2: bytes(value), 3: expiration}
    return SIGNATURE_DOMAIN + msgpack.packb(body, use_bin_type=True)


def sign_record(identity: Identity, key: str, subkey: bytes, value: bytes, expiration: int) -> Record:
    """Build and sign a record as ``identity``. Raises LocalProtocolError if it breaks §4.1/4.2."""
    record = Record(key, bytes(subkey), bytes(value), int(expiration), identity.public_key, b"\0" * 64)
    try:
        check_structure(record)
    except RemoteProtocolError as e:
        raise LocalProtocolError(e.code, e.message) from None
    sig = identity.sign(signed_payload(key, record.subkey, record.value, record.expiration))
    return Record(key, record.subkey, record.value, record.expiration, identity.public_key, sig)


def check_structure(record: Record) -> None:
    """Rules 4.1 and 4.2 of spec/dht.md §4 (no clock, no signature), by the record's table."""
    _from_table(record_to_obj(record) if isinstance(record, Record) else record)


def validate(record: Record, now: float) -> None:
    """Rules 4.3 to 4.6 of spec/dht.md §4 at local time ``now`` (unix seconds).

    Raises RemoteProtocolError with RECORD_EXPIRED, EXPIRATION_TOO_FAR or BAD_SIGNATURE.
    Assumes ``check_structure`` passed (the decoder guarantees it).
    """
    now_ms = to_ms(now)
    if record.expiration <= now_ms:
        raise RemoteProtocolError(ErrorCode.RECORD_EXPIRED, f"record expired {now_ms - record.expiration} ms ago")
    horizon = now_ms + to_ms(params.MAX_TTL + params.CLOCK_SKEW)
    if record.expiration > horizon:
        raise RemoteProtocolError(
            ErrorCode.EXPIRATION_TOO_FAR, f"record expires {record.expiration - now_ms} ms from now, more than allowed"
        )
    payload = signed_payload(record.key, record.subkey, record.value, record.expiration)
    if not verify_signature(record.public_key, payload, record.signature):
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "record signature does not verify")
    if is_peer_id_subkey(record.subkey) and record.signer_peer_id != record.subkey:
        raise RemoteProtocolError(ErrorCode.BAD_SIGNATURE, "peer-id subkey signed by another peer")


# --------------------------------------------------------------------------- codec

_FIELDS = ("key", "subkey", "value", "expiration", "public_key", "signature")


def record_to_obj(record: Record) -> dict[int, Any]:
    return {i: getattr(record, name) for i, name in enumerate(_FIELDS)}


@dataclass(frozen=True, eq=False)
class _RecordTable(WireStruct):
    """The record's field table (spec/dht.md §3.2). Every broken field rule is rule 4.1
    (``RECORD_INVALID``); the sizes of rule 4.2 (``RECORD_TOO_LARGE``) are checked after all the
    fields, as a cross-field rule, so that 4.1 comes first for any record."""

    ERROR_CODE: ClassVar[ErrorCode | None] = ErrorCode.RECORD_INVALID

    key: str = wire(0, Text(1, params.MAX_MESSAGE_BYTES))
    subkey: bytes = wire(1, Blob(0, params.MAX_MESSAGE_BYTES))
    value: bytes = wire(2, Blob(0, params.MAX_MESSAGE_BYTES))
    expiration: int = wire(3, UInt(0, params.MAX_EXPIRATION_MS))
    public_key: bytes = wire(4, Blob(PUBLIC_KEY_BYTES, PUBLIC_KEY_BYTES))
    signature: bytes = wire(5, Blob(SIGNATURE_BYTES, SIGNATURE_BYTES))

    def _check_rules(self) -> None:
        key_len = len(self.key.encode("utf-8"))
        for what, size, limit in (("key", key_len, params.MAX_KEY_BYTES), ("subkey", len(self.subkey), params.MAX_SUBKEY_BYTES),
                                  ("value", len(self.value), params.MAX_VALUE_BYTES)):
            if size > limit:
                raise Violation(ErrorCode.RECORD_TOO_LARGE, f"record {what} is {size} > {limit} bytes")


def _from_table(obj: Any) -> Record:
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.RECORD_INVALID, "record must be a map")
    try:
        row = _RecordTable._decode_body(obj)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, f"record {exc.message}") from None
    return Record(row.key, row.subkey, row.value, row.expiration, row.public_key, row.signature)


def record_from_obj(obj: Any) -> Record:
    """A record from its unpacked msgpack map; RemoteProtocolError(RECORD_INVALID/TOO_LARGE) if bad."""
    return _from_table(obj)


def encode_record(record: Record) -> bytes:
    return msgpack.packb(record_to_obj(record), use_bin_type=True)


def decode_record(data: bytes) -> Record:
    """A standalone record (as in the vectors); raises only RemoteProtocolError."""
    return record_from_obj(unpack(data))
