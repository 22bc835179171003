"""A general implementation of the Noise Protocol Framework (revision 34), sans-IO.

Handshake patterns are *data*: ``PATTERNS`` maps a pattern name to its pre-messages and its
message token lists (the one-way, fundamental interactive and deferred patterns of Noise §7 and
§18). Pattern modifiers are parsed from the protocol name: ``psk0``..``pskN`` (§9) and ``fallback``
(§10.2), combined with ``+`` (e.g. ``XXfallback+psk0``). Only the primitives BioPetals uses are
provided: DH ``25519``, cipher ``ChaChaPoly``, hash ``SHA256``.

The objects follow the spec's names: ``CipherState`` (§5.1), ``SymmetricState`` (§5.2) and
``HandshakeState`` (§5.3). Nothing here does I/O; ephemeral keys may be injected so that the
cacophony test vectors (tests/test_noise_vectors.py) and our own handshake vectors are
reproducible. The BioPetals handshake built on top of this is in ``handshake.py``
(spec/transport.md §2).

Failures: anything a peer can cause (a short message, a failed AEAD tag, an invalid public key)
raises ``RemoteProtocolError(HANDSHAKE_FAILED)``; an AEAD failure raises its subclass
``DecryptError`` so callers can tell "wrong key" from "garbled framing". Misuse by our own
caller (writing out of turn, a missing static key) raises ``LocalProtocolError``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from dataclasses import dataclass
from typing import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

DHLEN = 32
HASHLEN = 32
KEYLEN = 32
TAGLEN = 16
PSKLEN = 32
MAX_MESSAGE_LEN = 65535  # Noise §3: every Noise message is at most 65535 bytes
MAX_NONCE = 2**64 - 1  # reserved: EncryptWithAd/DecryptWithAd fail when n reaches it (§5.1)

_NONCE = struct.Struct("<4xQ")  # ChaChaPoly nonce: 32 bits of zeros, then n as 64-bit little-endian
_ZEROS32 = bytes(32)


class DecryptError(RemoteProtocolError):
    """An AEAD tag did not verify: the peer used other keys, or the bytes were altered."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.HANDSHAKE_FAILED, message)


# --------------------------------------------------------------------------- patterns as data

# Token names (Noise §7.1).
E, S, EE, ES, SE, SS, PSK = "e", "s", "ee", "es", "se", "ss", "psk"


@dataclass(frozen=True)
class MessagePattern:
    """One message: ``initiator_sends`` is True for ``->`` (Alice to Bob), False for ``<-``."""

    initiator_sends: bool
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class HandshakePattern:
    name: str
    initiator_pre: tuple[str, ...]  # "e", "s" or "e","s": keys the responder knows beforehand
    responder_pre: tuple[str, ...]  # keys the initiator knows beforehand
    messages: tuple[MessagePattern, ...]

    @property
    def one_way(self) -> bool:
        return len(self.messages) == 1


def _parse_pattern(name: str, text: str) -> HandshakePattern:
    """Parse the spec's notation: lines of ``-> tokens`` / ``<- tokens``, pre-messages before ``...``."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    pre: list[MessagePattern] = []
    msgs: list[MessagePattern] = []
    target = msgs
    if "..." in lines:
        target = pre
    for ln in lines:
        if ln == "...":
            target = msgs
            continue
        arrow, _, rest = ln.partition(" ")
        toks = tuple(t.strip() for t in rest.split(",") if t.strip())
        target.append(MessagePattern(arrow == "->", toks))
    init_pre: tuple[str, ...] = ()
    resp_pre: tuple[str, ...] = ()
    for p in pre:
        if p.initiator_sends:
            init_pre = p.tokens
        else:
            resp_pre = p.tokens
    return HandshakePattern(name, init_pre, resp_pre, tuple(msgs))


# Noise rev 34: §7.4 one-way, §7.5 interactive fundamental, §18.2 deferred patterns.
_PATTERN_TEXT: dict[str, str] = {
    "N": "<- s\n...\n-> e, es",
    "K": "-> s\n<- s\n...\n-> e, es, ss",
    "X": "<- s\n...\n-> e, es, s, ss",
    "NN": "-> e\n<- e, ee",
    "NK": "<- s\n...\n-> e, es\n<- e, ee",
    "NX": "-> e\n<- e, ee, s, es",
    "KN": "-> s\n...\n-> e\n<- e, ee, se",
    "KK": "-> s\n<- s\n...\n-> e, es, ss\n<- e, ee, se",
    "KX": "-> s\n...\n-> e\n<- e, ee, se, s, es",
    "XN": "-> e\n<- e, ee\n-> s, se",
    "XK": "<- s\n...\n-> e, es\n<- e, ee\n-> s, se",
    "XX": "-> e\n<- e, ee, s, es\n-> s, se",
    "IN": "-> e, s\n<- e, ee, se",
    "IK": "<- s\n...\n-> e, es, s, ss\n<- e, ee, se",
    "IX": "-> e, s\n<- e, ee, se, s, es",
    "NK1": "<- s\n...\n-> e\n<- e, ee, es",
    "NX1": "-> e\n<- e, ee, s\n-> es",
    "X1N": "-> e\n<- e, ee\n-> s\n<- se",
    "X1K": "<- s\n...\n-> e, es\n<- e, ee\n-> s\n<- se",
    "XK1": "<- s\n...\n-> e\n<- e, ee, es\n-> s, se",
    "X1K1": "<- s\n...\n-> e\n<- e, ee, es\n-> s\n<- se",
    "X1X": "-> e\n<- e, ee, s, es\n-> s\n<- se",
    "XX1": "-> e\n<- e, ee, s\n-> es, s, se",
    "X1X1": "-> e\n<- e, ee, s\n-> es, s\n<- se",
    "K1N": "-> s\n...\n-> e\n<- e, ee\n-> se",
    "K1K": "-> s\n<- s\n...\n-> e, es\n<- e, ee\n-> se",
    "KK1": "-> s\n<- s\n...\n-> e\n<- e, ee, se, es",
    "K1K1": "-> s\n<- s\n...\n-> e\n<- e, ee, es\n-> se",
    "K1X": "-> s\n...\n-> e\n<- e, ee, s, es\n-> se",
    "KX1": "-> s\n...\n-> e\n<- e, ee, se, s\n-> es",
    "K1X1": "-> s\n...\n-> e\n<- e, ee, s\n-> se, es",
    "I1N": "-> e, s\n<- e, ee\n-> se",
    "I1K": "<- s\n...\n-> e, es, s\n<- e, ee\n-> se",
    "IK1": "<- s\n...\n-> e, s\n<- e, ee, se, es",
    "I1K1": "<- s\n...\n-> e, s\n<- e, ee, es\n-> se",
    "I1X": "-> e, s\n<- e, ee, s, es\n-> se",
    "IX1": "-> e, s\n<- e, ee, se, s\n-> es",
    "I1X1": "-> e, s\n<- e, ee, s\n-> se, es",
}

PATTERNS: dict[str, HandshakePattern] = {n: _parse_pattern(n, t) for n, t in _PATTERN_TEXT.items()}

_PATTERN_NAME_RE = re.compile(r"^([A-Z][A-Z0-9]*)((?:[a-z][a-z0-9]*)(?:\+[a-z][a-z0-9]*)*)?$")
_PSK_RE = re.compile(r"^psk([0-9])$")


def apply_modifiers(base: HandshakePattern, modifiers: Sequence[str]) -> HandshakePattern:
    """Apply ``fallback`` (§10.2) and ``pskN`` (§9.2) to a base pattern, in the order given."""
    pat = base
    for mod in modifiers:
        m = _PSK_RE.match(mod)
        if mod == "fallback":
            first = pat.messages[0]
            if not first.initiator_sends or pat.initiator_pre or set(first.tokens) - {E, S}:
                raise ValueError(f"fallback cannot apply to pattern {pat.name}")
            pat = HandshakePattern(pat.name, first.tokens, pat.responder_pre, pat.messages[1:])
        elif m:
            idx = int(m.group(1))
            msgs = list(pat.messages)
            if idx > len(msgs):
                raise ValueError(f"{mod} is past the last message of {pat.name}")
            if idx == 0:
                msgs[0] = MessagePattern(msgs[0].initiator_sends, (PSK, *msgs[0].tokens))
            else:
                msgs[idx - 1] = MessagePattern(msgs[idx - 1].initiator_sends, (*msgs[idx - 1].tokens, PSK))
            pat = HandshakePattern(pat.name, pat.initiator_pre, pat.responder_pre, tuple(msgs))
        else:
            raise ValueError(f"unknown pattern modifier {mod!r}")
    return pat


@dataclass(frozen=True)
class ProtocolName:
    """A parsed ``Noise_<pattern>_<dh>_<cipher>_<hash>`` name (Noise §8)."""

    name: str
    pattern: HandshakePattern
    modifiers: tuple[str, ...]

    @property
    def psk_count(self) -> int:
        return sum(1 for m in self.modifiers if m.startswith("psk"))

    @classmethod
    def parse(cls, name: str) -> ProtocolName:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise ValueError(f"not a Noise protocol name: {name!r}")
        _, pat, dh, cipher, hashname = parts
        if (dh, cipher, hashname) != ("25519", "ChaChaPoly", "SHA256"):
            raise ValueError(f"unsupported primitives in {name!r}: only 25519/ChaChaPoly/SHA256")
        m = _PATTERN_NAME_RE.match(pat)
        if not m or m.group(1) not in PATTERNS:
            raise ValueError(f"unknown handshake pattern in {name!r}")
        # The first modifier is glued to the pattern name ("XXpsk0"), the rest joined by "+".
        mods = tuple(m.group(2).split("+")) if m.group(2) else ()
        return cls(name, apply_modifiers(PATTERNS[m.group(1)], mods), mods)


# --------------------------------------------------------------------------- primitives


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def hkdf(chaining_key: bytes, ikm: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """Noise §4.3 HKDF with HMAC-SHA256: two or three 32-byte outputs."""
    temp_key = _hmac(chaining_key, ikm)
    out1 = _hmac(temp_key, b"\x01")
    out2 = _hmac(temp_key, out1 + b"\x02")
    if num_outputs == 2:
        return out1, out2
    return out1, out2, _hmac(temp_key, out2 + b"\x03")


class KeyPair:
    """An X25519 key pair; ``private`` and ``public`` are raw 32-byte strings."""

    __slots__ = ("_key", "private", "public")

    def __init__(self, private: bytes | None = None) -> None:
        self._key = X25519PrivateKey.generate() if private is None else X25519PrivateKey.from_private_bytes(private)
        self.private = self._key.private_bytes_raw()
        self.public = self._key.public_key().public_bytes_raw()

    def dh(self, remote_public: bytes) -> bytes:
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(remote_public))
        except ValueError:  # low-order point: the shared secret would be all zeros
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "peer sent an invalid X25519 public key") from None


class CipherState:
    """Noise §5.1: a key ``k`` (or none) and a 64-bit nonce ``n``.

    Encryption and decryption take and return bytes-like objects; the ``*_into`` variants write
    straight into a caller's buffer to avoid a copy on the secure channel's hot path.
    """

    __slots__ = ("_k", "_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._k: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        self._k = key
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    def has_key(self) -> bool:
        return self._k is not None

    @property
    def key(self) -> bytes | None:
        return self._k

    def set_nonce(self, n: int) -> None:
        self.n = n

    def _next_nonce(self, local: bool) -> bytes:
        if self.n >= MAX_NONCE:
            cls = LocalProtocolError if local else RemoteProtocolError
            raise cls(ErrorCode.HANDSHAKE_FAILED, "nonce exhausted: the channel must be re-established")
        return _NONCE.pack(self.n)

    def encrypt_with_ad(self, ad: bytes | None, plaintext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        out = self._aead.encrypt(self._next_nonce(True), plaintext, ad or None)
        self.n += 1
        return out

    def encrypt_into(self, ad: bytes | None, plaintext: bytes | memoryview, out: memoryview) -> None:
        """Encrypt into ``out`` (exactly ``len(plaintext) + 16`` bytes). Requires a key."""
        if self._aead is None:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "encrypt_into needs a keyed CipherState")
        self._aead.encrypt_into(self._next_nonce(True), plaintext, ad or None, out)
        self.n += 1

    def decrypt_with_ad(self, ad: bytes | None, ciphertext: bytes | memoryview) -> bytes:
        if self._aead is None:
            return bytes(ciphertext)
        if len(ciphertext) < TAGLEN:
            raise DecryptError("ciphertext shorter than the 16-byte authentication tag")
        try:
            out = self._aead.decrypt(self._next_nonce(False), ciphertext, ad or None)
        except InvalidTag:
            raise DecryptError("authentication tag did not verify") from None
        self.n += 1  # only after success (Noise §5.1)
        return out

    def rekey(self) -> None:
        """Noise §4.2/§11.3: k = first 32 bytes of ENCRYPT(k, 2^64-1, zerolen, zeros). n is unchanged."""
        if self._aead is None:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "rekey needs a keyed CipherState")
        new_k = self._aead.encrypt(_NONCE.pack(MAX_NONCE), _ZEROS32, None)[:KEYLEN]
        self._k = new_k
        self._aead = ChaCha20Poly1305(new_k)


class SymmetricState:
    """Noise §5.2: chaining key ``ck``, handshake hash ``h`` and a CipherState."""

    __slots__ = ("cs", "ck", "h")

    def __init__(self, protocol_name: bytes) -> None:
        self.h = protocol_name.ljust(HASHLEN, b"\x00") if len(protocol_name) <= HASHLEN else _hash(protocol_name)
        self.ck = self.h
        self.cs = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(temp_k[:KEYLEN])

    def mix_hash(self, data: bytes) -> None:
        self.h = _hash(self.h + data)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, temp_k = hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(temp_k[:KEYLEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = hkdf(self.ck, b"", 2)
        return CipherState(k1[:KEYLEN]), CipherState(k2[:KEYLEN])


class HandshakeState:
    """Noise §5.3 for one party.

    ``initiator`` is Alice, the party on the left of the pattern's arrows. Whose turn it is
    follows each message's arrow, so fallback (Bob-initiated) patterns work too. ``s`` and ``e``
    are our static and (injected, for tests only) ephemeral private keys as raw 32 bytes; ``rs``
    and ``re`` are the remote public keys known beforehand; ``psks`` are used in the order the
    ``psk`` tokens appear.
    """

    def __init__(
        self,
        protocol_name: str,
        initiator: bool,
        *,
        prologue: bytes = b"",
        s: bytes | None = None,
        e: bytes | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        try:
            self.protocol = ProtocolName.parse(protocol_name)
        except ValueError as exc:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, str(exc)) from None
        if len(psks) != self.protocol.psk_count or any(len(p) != PSKLEN for p in psks):
            raise LocalProtocolError(
                ErrorCode.HANDSHAKE_FAILED, f"{protocol_name} needs {self.protocol.psk_count} PSK(s) of 32 bytes"
            )
        self.initiator = initiator
        self.psk_mode = self.protocol.psk_count > 0
        self.ss = SymmetricState(protocol_name.encode("ascii"))
        self.s = KeyPair(s) if s is not None else None
        self._fixed_e = e
        self.e: KeyPair | None = None
        self.rs = rs
        self.re = re
        self._psks = list(psks)
        self._msg_index = 0
        self._cipher_pair: tuple[CipherState, CipherState] | None = None

        pat = self.protocol.pattern
        self.ss.mix_hash(prologue)
        # Pre-messages (§5.3 Initialize): initiator's keys first, then the responder's.
        for pre, ours in ((pat.initiator_pre, initiator), (pat.responder_pre, not initiator)):
            for tok in pre:
                if tok == S:
                    key = (self.s.public if self.s else None) if ours else self.rs
                else:  # E: only fallback patterns pre-share an ephemeral
                    if ours and self._fixed_e is not None and self.e is None:
                        self.e = KeyPair(self._fixed_e)
                    key = (self.e.public if self.e else None) if ours else self.re
                if key is None:
                    raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, f"pre-message key {tok!r} is missing")
                self.ss.mix_hash(key)
                if tok == E and self.psk_mode:
                    self.ss.mix_key(key)

    # ------------------------------------------------------------------ state queries

    @property
    def handshake_hash(self) -> bytes:
        """The current ``h``; after the last message this is the channel-binding handshake hash."""
        return self.ss.h

    @property
    def complete(self) -> bool:
        return self._msg_index >= len(self.protocol.pattern.messages)

    @property
    def is_my_turn(self) -> bool:
        if self.complete:
            return False
        return self.protocol.pattern.messages[self._msg_index].initiator_sends == self.initiator

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator->responder, responder->initiator) CipherStates; only after the last message."""
        if not self.complete:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "split() before the handshake finished")
        if self._cipher_pair is None:
            self._cipher_pair = self.ss.split()
        return self._cipher_pair

    # ------------------------------------------------------------------ helpers

    def _dh(self, token: str) -> bytes:
        # "es": initiator's e with responder's s, regardless of who computes it (§5.3).
        first, second = token[0], token[1]
        mine, theirs = (first, second) if self.initiator else (second, first)
        local = self.e if mine == E else self.s
        remote = self.re if theirs == E else self.rs
        if local is None or remote is None:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, f"token {token!r}: a key is missing")
        return local.dh(remote)

    def _next_psk(self) -> bytes:
        return self._psks.pop(0)

    # ------------------------------------------------------------------ messages

    def write_message(self, payload: bytes = b"") -> bytes:
        if not self.is_my_turn:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "write_message out of turn")
        msg = self.protocol.pattern.messages[self._msg_index]
        out = bytearray()
        ss = self.ss
        for tok in msg.tokens:
            if tok == E:
                if self.e is None:
                    self.e = KeyPair(self._fixed_e)
                out += self.e.public
                ss.mix_hash(self.e.public)
                if self.psk_mode:
                    ss.mix_key(self.e.public)
            elif tok == S:
                if self.s is None:
                    raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "pattern sends 's' but no static key given")
                out += ss.encrypt_and_hash(self.s.public)
            elif tok == PSK:
                ss.mix_key_and_hash(self._next_psk())
            else:
                ss.mix_key(self._dh(tok))
        out += ss.encrypt_and_hash(payload)
        if len(out) > MAX_MESSAGE_LEN:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"Noise message of {len(out)} bytes > 65535")
        self._msg_index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process a peer's handshake message and return its payload.

        Raises RemoteProtocolError(HANDSHAKE_FAILED) for a malformed message and ``DecryptError``
        when an AEAD tag fails. After any error this object must be discarded (§5.3).
        """
        if self.complete or self.is_my_turn:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "read_message out of turn")
        if len(message) > MAX_MESSAGE_LEN:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "Noise message longer than 65535 bytes")
        msg = self.protocol.pattern.messages[self._msg_index]
        ss = self.ss
        view = bytes(message)
        pos = 0
        for tok in msg.tokens:
            if tok == E:
                if len(view) - pos < DHLEN:
                    raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "handshake message truncated (e)")
                self.re = view[pos : pos + DHLEN]
                pos += DHLEN
                ss.mix_hash(self.re)
                if self.psk_mode:
                    ss.mix_key(self.re)
            elif tok == S:
                n = DHLEN + TAGLEN if ss.cs.has_key() else DHLEN
                if len(view) - pos < n:
                    raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "handshake message truncated (s)")
                self.rs = ss.decrypt_and_hash(view[pos : pos + n])
                pos += n
            elif tok == PSK:
                ss.mix_key_and_hash(self._next_psk())
            else:
                ss.mix_key(self._dh(tok))
        payload = ss.decrypt_and_hash(view[pos:])
        self._msg_index += 1
        return payload
