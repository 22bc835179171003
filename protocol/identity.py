"""Ed25519 peer identities, libp2p key protobufs and peer ids (sans-IO, no file access).

See spec/transport.md §1.1-§1.4. Keys are encoded exactly as libp2p
does (libp2p/specs peer-ids/peer-ids.md), so a key file written here loads in
go-libp2p / rust-libp2p and yields the same ``12D3KooW…`` peer id:

- ``PublicKey`` protobuf = ``08 01 12 20 <32-byte Ed25519 public key>`` (36 bytes).
- ``PrivateKey`` protobuf = ``08 01 12 40 <32-byte seed><32-byte public key>`` (68 bytes).
- peer id = identity multihash of the ``PublicKey`` protobuf = ``00 24 <36 bytes>``,
  written in base58btc.

Only the two protobuf fields are supported, hand-decoded and strict: a decoder either
returns a value or raises ``RemoteProtocolError`` (MALFORMED for a bad protobuf,
BAD_IDENTITY for a well-formed key we cannot use, INVALID_FIELD for a bad peer id).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import cached_property

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "Identity",
    "PeerId",
    "decode_public_key_proto",
    "decode_private_key_proto",
    "encode_public_key_proto",
    "encode_private_key_proto",
    "verify_signature",
    "KEY_TYPE_ED25519",
    "PUBLIC_KEY_PROTO_LEN",
    "PRIVATE_KEY_PROTO_LEN",
    "SIGNATURE_LEN",
    "MAX_PEER_ID_STRING_LEN",
]

# libp2p KeyType enum (peer-ids.md): RSA = 0, Ed25519 = 1, Secp256k1 = 2, ECDSA = 3.
KEY_TYPE_ED25519 = 1
_KEY_TYPE_NAMES = {0: "RSA", 1: "Ed25519", 2: "Secp256k1", 3: "ECDSA"}

ED25519_KEY_LEN = 32
SIGNATURE_LEN = 64
PUBLIC_KEY_PROTO_LEN = 4 + ED25519_KEY_LEN  # 36
PRIVATE_KEY_PROTO_LEN = 4 + 2 * ED25519_KEY_LEN  # 68

# A key protobuf is never larger than this (the legacy 96-byte private form plus
# headers); anything longer is rejected before we look at it.
_MAX_KEY_PROTO_LEN = 128

# Multihash codes (multiformats/multicodec). libp2p inlines keys whose PublicKey
# protobuf is <= 42 bytes with the identity code; bigger keys (RSA) are sha2-256'd.
_MULTIHASH_IDENTITY = 0x00
_MULTIHASH_SHA2_256 = 0x12
_MAX_INLINE_KEY_LEN = 42
# CIDv1 textual form of a peer id (peer-ids.md "String representation").
_CID_V1 = 0x01
_CODEC_LIBP2P_KEY = 0x72

# 38 multihash bytes -> 52 base58 characters; the base32 CID form is 63. Checked
# before decoding so hostile input cannot make base58's quadratic decoder work hard.
MAX_PEER_ID_STRING_LEN = 128


# --------------------------------------------------------------------------- protobuf


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.MALFORMED, message)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """Read a protobuf varint at ``pos``; reject truncated and non-minimal encodings."""
    value = 0
    for i in range(10):  # a uint64 never needs more than 10 bytes
        if pos + i >= len(data):
            raise _malformed(f"{what}: truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise _malformed(f"{what}: non-minimal varint encoding")
            if value >= 1 << 64:
                raise _malformed(f"{what}: varint exceeds 64 bits")
            return value, pos + i + 1
    raise _malformed(f"{what}: varint longer than 10 bytes")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _encode_key_proto(key_type: int, data: bytes) -> bytes:
    # Field 1 (Type, varint, tag 0x08) then field 2 (Data, bytes, tag 0x12): the
    # field-number order that peer-ids.md asks for, so peer ids are deterministic.
    return b"\x08" + _encode_varint(key_type) + b"\x12" + _encode_varint(len(data)) + data


def _decode_key_proto(data: bytes, what: str) -> tuple[int, bytes]:
    """Decode a libp2p ``PublicKey``/``PrivateKey`` message into (type, data).

    Strict: exactly field 1 (varint) then field 2 (length-delimited), each once, in
    that order, with minimal varints, nothing else. A peer id is derived from the
    public key's protobuf *bytes*, so any second encoding of the same key would be
    a second peer id for one identity; canonical-only rules that out.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"{what} must be bytes")
    data = bytes(data)
    if len(data) > _MAX_KEY_PROTO_LEN:
        raise RemoteProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"{what}: {len(data)} bytes, longer than any Ed25519 key"
        )
    if not data:
        raise _malformed(f"{what}: empty")
    tag, pos = _read_varint(data, 0, what)
    if tag != 0x08:
        raise _malformed(f"{what}: expected field 1 (Type, varint) first, got tag {tag:#x}")
    key_type, pos = _read_varint(data, pos, what)
    if pos >= len(data):
        raise _malformed(f"{what}: missing field 2 (Data)")
    tag, pos = _read_varint(data, pos, what)
    if tag != 0x12:
        raise _malformed(f"{what}: expected field 2 (Data, bytes) after Type, got tag {tag:#x}")
    length, pos = _read_varint(data, pos, what)
    if length > len(data) - pos:
        raise _malformed(f"{what}: Data length {length} runs past the end ({len(data) - pos} left)")
    payload = data[pos : pos + length]
    if pos + length != len(data):
        raise _malformed(f"{what}: {len(data) - pos - length} trailing bytes after Data")
    return key_type, payload


def _check_ed25519_type(key_type: int, what: str) -> None:
    if key_type != KEY_TYPE_ED25519:
        name = _KEY_TYPE_NAMES.get(key_type, f"unknown type {key_type}")
        raise RemoteProtocolError(
            ErrorCode.BAD_IDENTITY, f"{what}: key type {name} is not supported (only Ed25519)"
        )


def encode_public_key_proto(public_key: bytes) -> bytes:
    """Raw 32-byte Ed25519 public key -> libp2p ``PublicKey`` protobuf (36 bytes)."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != ED25519_KEY_LEN:
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, "Ed25519 public key must be 32 bytes")
    return _encode_key_proto(KEY_TYPE_ED25519, bytes(public_key))


def decode_public_key_proto(data: bytes) -> bytes:
    """libp2p ``PublicKey`` protobuf -> raw 32-byte Ed25519 public key.

    Raises RemoteProtocolError: MALFORMED (bad protobuf), BAD_IDENTITY (not Ed25519,
    Data not 32 bytes), LIMIT_EXCEEDED (over 128 bytes).
    """
    key_type, payload = _decode_key_proto(data, "PublicKey protobuf")
    _check_ed25519_type(key_type, "PublicKey protobuf")
    if len(payload) != ED25519_KEY_LEN:
        raise RemoteProtocolError(
            ErrorCode.BAD_IDENTITY,
            f"PublicKey protobuf: Ed25519 Data is {len(payload)} bytes, expected 32",
        )
    return payload


def encode_private_key_proto(seed: bytes) -> bytes:
    """32-byte Ed25519 seed -> libp2p ``PrivateKey`` protobuf, Data = seed || public key."""
    return Identity.from_private_bytes(seed).to_private_key_proto()


def decode_private_key_proto(data: bytes) -> bytes:
    """libp2p ``PrivateKey`` protobuf -> 32-byte Ed25519 seed.

    Data must be 64 bytes ``seed || public`` (what libp2p writes) or the legacy
    96-byte ``seed || public || public``; the embedded public key must be the one
    the seed derives. A bare 32-byte seed is rejected, as go-libp2p does: it carries
    no public key to check the seed against.
    """
    key_type, payload = _decode_key_proto(data, "PrivateKey protobuf")
    _check_ed25519_type(key_type, "PrivateKey protobuf")
    if len(payload) == 96:
        if payload[32:64] != payload[64:96]:
            raise RemoteProtocolError(
                ErrorCode.BAD_IDENTITY,
                "PrivateKey protobuf: legacy 96-byte Ed25519 key has two different public keys",
            )
        payload = payload[:64]
    if len(payload) != 64:
        raise RemoteProtocolError(
            ErrorCode.BAD_IDENTITY,
            f"PrivateKey protobuf: Ed25519 Data is {len(payload)} bytes, expected 64 (seed || public key)",
        )
    seed, public = payload[:32], payload[32:]
    derived = _public_from_seed(seed)
    if derived != public:
        raise RemoteProtocolError(
            ErrorCode.BAD_IDENTITY,
            "PrivateKey protobuf: embedded public key does not match the private key",
        )
    return seed


def _public_from_seed(seed: bytes) -> bytes:
    return (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


# --------------------------------------------------------------------------- signatures


def verify_signature(public_key_raw32: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 (RFC 8032) signature of ``data``.

    Never raises on peer-supplied values: a key or signature of the wrong length, or
    a key that is not a curve point, is simply "not valid".
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, "signed data must be bytes")
    if (
        not isinstance(public_key_raw32, (bytes, bytearray))
        or not isinstance(signature, (bytes, bytearray))
        or len(public_key_raw32) != ED25519_KEY_LEN
        or len(signature) != SIGNATURE_LEN
    ):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key_raw32)).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True


# --------------------------------------------------------------------------- peer id


def _bad_peer_id(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_FIELD, f"invalid peer id: {message}")


@dataclass(frozen=True, order=True)
class PeerId:
    """A libp2p peer id: the identity multihash of an Ed25519 ``PublicKey`` protobuf.

    Only inline (identity-multihash) Ed25519 ids are valid here, so the public key
    can always be recovered from the id itself (``public_key``). ``str()`` is the
    base58btc form ``12D3KooW…``. Hashable and ordered (by multihash bytes).
    """

    multihash: bytes

    def __post_init__(self) -> None:
        # Every PeerId in memory is valid, however it was built.
        _parse_multihash(self.multihash)

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        """From a raw 32-byte Ed25519 public key."""
        return cls.from_public_key_proto(encode_public_key_proto(public_key))

    @classmethod
    def from_public_key_proto(cls, proto: bytes) -> PeerId:
        """From a libp2p ``PublicKey`` protobuf (validated; RemoteProtocolError if bad)."""
        decode_public_key_proto(proto)
        proto = bytes(proto)
        return cls(bytes([_MULTIHASH_IDENTITY]) + _encode_varint(len(proto)) + proto)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerId:
        """From multihash bytes (as carried in binary multiaddrs and DHT records)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "peer id bytes must be bytes")
        return cls(bytes(data))

    @classmethod
    def from_base58(cls, text: str) -> PeerId:
        """From the base58btc string ``12D3KooW…``; INVALID_FIELD on anything else."""
        if not isinstance(text, str):
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "peer id text must be str")
        if not text:
            raise _bad_peer_id("empty string")
        if len(text) > MAX_PEER_ID_STRING_LEN:
            raise _bad_peer_id(f"{len(text)} characters, longer than any Ed25519 peer id")
        if not text.isascii():
            raise _bad_peer_id(f"{text!r} contains non-ASCII characters")
        try:
            raw = base58.b58decode(text)
        except ValueError:
            raise _bad_peer_id(f"{text!r} is not base58btc") from None
        peer_id = cls(raw)
        # The base58 library tolerates trailing whitespace; one id, one spelling.
        if peer_id.to_base58() != text:
            raise _bad_peer_id(f"{text!r} is not in canonical base58btc form")
        return peer_id

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        """From either text form libp2p defines: base58btc, or a base32 CIDv1 (``bafz…``).

        peer-ids.md: implementations MUST parse both; we always *write* base58btc.
        """
        if isinstance(text, str) and text.startswith("b") and len(text) <= MAX_PEER_ID_STRING_LEN:
            return cls._from_cid_base32(text)
        return cls.from_base58(text)

    @classmethod
    def _from_cid_base32(cls, text: str) -> PeerId:
        body = text[1:]
        if not body.isascii() or not body.isalnum() or body != body.lower():
            raise _bad_peer_id(f"{text!r} is not a lower-case base32 CID")
        try:
            raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        except ValueError:
            raise _bad_peer_id(f"{text!r} is not a base32 CID") from None
        version, pos = _read_mh_varint(raw, 0)
        codec, pos = _read_mh_varint(raw, pos)
        if version != _CID_V1 or codec != _CODEC_LIBP2P_KEY:
            raise _bad_peer_id(f"{text!r} is not a CIDv1 with the libp2p-key codec")
        return cls(raw[pos:])

    def to_bytes(self) -> bytes:
        return self.multihash

    def to_base58(self) -> str:
        return self._base58

    @cached_property
    def _base58(self) -> str:
        # Peer ids are printed constantly (logs, multiaddrs, DHT keys); encode once.
        return base58.b58encode(self.multihash).decode("ascii")

    @property
    def public_key_proto(self) -> bytes:
        """The ``PublicKey`` protobuf inlined in this id."""
        return _parse_multihash(self.multihash)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key inlined in this id."""
        return self.public_key_proto[4:]

    def __str__(self) -> str:
        return self.to_base58()

    def __repr__(self) -> str:
        return f"PeerId({self.to_base58()!r})"


def _read_mh_varint(data: bytes, pos: int) -> tuple[int, int]:
    try:
        return _read_varint(data, pos, "multihash")
    except RemoteProtocolError as exc:
        raise _bad_peer_id(exc.message) from None


def _parse_multihash(mh: bytes) -> bytes:
    """Validate peer id multihash bytes; return the inlined ``PublicKey`` protobuf."""
    if not isinstance(mh, bytes):
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, "PeerId.multihash must be bytes")
    if len(mh) > _MAX_KEY_PROTO_LEN:
        raise _bad_peer_id(f"{len(mh)} bytes, longer than any Ed25519 peer id")
    code, pos = _read_mh_varint(mh, 0)
    if code == _MULTIHASH_SHA2_256:
        raise _bad_peer_id(
            "sha2-256 multihash (an RSA or other large key); BioPetals peers are Ed25519 only"
        )
    if code != _MULTIHASH_IDENTITY:
        raise _bad_peer_id(f"multihash code {code:#x} is not identity (0x00)")
    length, pos = _read_mh_varint(mh, pos)
    if length != len(mh) - pos:
        raise _bad_peer_id(f"multihash digest length {length} but {len(mh) - pos} bytes follow")
    if length > _MAX_INLINE_KEY_LEN:
        raise _bad_peer_id(f"identity multihash of {length} bytes (libp2p inlines at most 42)")
    proto = mh[pos:]
    try:
        decode_public_key_proto(proto)
    except RemoteProtocolError as exc:
        raise _bad_peer_id(f"inlined key: {exc.message}") from None
    return proto


# --------------------------------------------------------------------------- identity


class Identity:
    """This peer's Ed25519 key pair. Holds secret material: ``repr`` shows the peer id only.

    Construction is pure; reading and writing key files is ``biopetals.transport.keyfiles``.
    """

    __slots__ = ("_private", "_seed", "_public", "_peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._seed = private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._peer_id = PeerId.from_public_key(self._public)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (OS CSPRNG via ``cryptography``)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, seed: bytes) -> Identity:
        """From the raw 32-byte Ed25519 seed (RFC 8032 private key)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != ED25519_KEY_LEN:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "Ed25519 private key must be 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @classmethod
    def from_private_key_proto(cls, data: bytes) -> Identity:
        """From a libp2p ``PrivateKey`` protobuf (64-byte or legacy 96-byte Ed25519 Data).

        Raises RemoteProtocolError (MALFORMED / BAD_IDENTITY / LIMIT_EXCEEDED) on bad bytes.
        """
        return cls.from_private_bytes(decode_private_key_proto(data))

    @property
    def private_key_bytes(self) -> bytes:
        """The raw 32-byte seed. Secret."""
        return self._seed

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._public

    @property
    def public_key_proto(self) -> bytes:
        """The libp2p ``PublicKey`` protobuf (36 bytes) sent to peers."""
        return _encode_key_proto(KEY_TYPE_ED25519, self._public)

    @property
    def peer_id(self) -> PeerId:
        return self._peer_id

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature (64 bytes, deterministic per RFC 8032)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "data to sign must be bytes")
        return self._private.sign(bytes(data))

    def to_private_key_proto(self) -> bytes:
        """libp2p ``PrivateKey`` protobuf as libp2p writes it: Data = seed || public (68 bytes)."""
        return _encode_key_proto(KEY_TYPE_ED25519, self._seed + self._public)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return self._public == other._public

    def __hash__(self) -> int:
        return hash(self._public)

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id.to_base58()!r})"
