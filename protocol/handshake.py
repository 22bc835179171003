"""The BioPetals authenticated handshake as a sans-IO state machine (h11 style).

See spec/transport.md §2 ("Handshake"). Private swarm: ``Noise_XXpsk0_25519_ChaChaPoly_SHA256``
with the 32-byte swarm key as the PSK; public swarm: ``Noise_XX_25519_ChaChaPoly_SHA256``. The
prologue is ``PROTOCOL_ID`` (``/biopetals/noise/1``). Every handshake message travels in a frame
``length (2 bytes, big-endian) || Noise message``::

    -> psk, e                   message 1: payload empty (48 bytes keyed, 32 public)
    <- e, ee, s, es             message 2: payload = responder's identity (HandshakePayload)
    -> s, se                    message 3: payload = initiator's identity

A responder that cannot authenticate message 1 (wrong or missing swarm key, or another protocol
version) sends the short cleartext ``Rejection`` frame and fails with SWARM_KEY_MISMATCH; it
never sends its static key, peer id or anything else.

API (write against this; it is stable)::

    hs = Handshake(Role.INITIATOR, identity, swarm_key, expected_peer_id=peer_id)
    sock.write(hs.data_to_send())              # the initiator's message 1 is queued at once
    while not hs.is_done:
        result = hs.receive_data(sock.read())  # b"" = the peer closed; returns the result when done
        sock.write(hs.data_to_send())          # possibly message 2 / 3, possibly a Rejection
    result.channel                             # SecureChannel; bytes after message 3 already fed in

``receive_data`` raises ``RemoteProtocolError`` (SWARM_KEY_MISMATCH, PEER_ID_MISMATCH,
BAD_IDENTITY, HANDSHAKE_FAILED, UNSUPPORTED_VERSION) and the handshake is then FAILED; the caller
MUST still write ``data_to_send()`` (it may hold the Rejection) and then close the connection.
Calling it again after DONE or FAILED raises ``LocalProtocolError``. There is no clock here: the
runtime MUST abort a handshake that is not done within ``HANDSHAKE_TIMEOUT`` seconds.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import ClassVar, Final

import msgpack

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from biopetals.protocol.identity import (
    SIGNATURE_LEN,
    Identity,
    PeerId,
    decode_public_key_proto,
    verify_signature,
)
from biopetals.protocol.noise import DHLEN, TAGLEN, DecryptError, HandshakeState, KeyPair
from biopetals.protocol.reader import ReadLimits, read_map
from biopetals.protocol.secure_channel import REKEY_INTERVAL, SecureChannel
from biopetals.protocol.table import Blob, Violation, WireStruct, wire

__all__ = [
    "Handshake",
    "HandshakeResult",
    "HandshakePayload",
    "Rejection",
    "RejectReason",
    "Role",
    "State",
    "PROTOCOL_ID",
    "NOISE_PROTOCOL_PRIVATE",
    "NOISE_PROTOCOL_PUBLIC",
    "SIGNATURE_PREFIX",
    "SWARM_KEY_LEN",
    "MAX_HANDSHAKE_MESSAGE_LEN",
    "HANDSHAKE_TIMEOUT",
]

#: Protocol id, also the Noise prologue (spec/transport.md §2.2).
PROTOCOL_ID: Final = "/biopetals/noise/1"
NOISE_PROTOCOL_PRIVATE: Final = "Noise_XXpsk0_25519_ChaChaPoly_SHA256"
NOISE_PROTOCOL_PUBLIC: Final = "Noise_XX_25519_ChaChaPoly_SHA256"
#: Domain separation for the identity signature over the Noise static key (§2.5).
SIGNATURE_PREFIX: Final = b"biopetals-noise-static-key:"
SWARM_KEY_LEN: Final = 32
#: Largest handshake message accepted (the length prefix is checked before buffering the body).
MAX_HANDSHAKE_MESSAGE_LEN: Final = 2048
#: Seconds within which the runtime MUST finish (or abort) a handshake (§2.10).
HANDSHAKE_TIMEOUT: Final = 10.0

_LEN = struct.Struct(">H")
_MSG1_PUBLIC_LEN = DHLEN  # e, empty cleartext payload
_MSG1_PRIVATE_LEN = DHLEN + TAGLEN  # e, empty encrypted payload
_MSG2_MIN_LEN = DHLEN + (DHLEN + TAGLEN) + TAGLEN  # e, encrypted s, encrypted empty payload = 96
_REJECT_MAGIC = b"biopetals/reject"
_PAYLOAD_KEY_IDENTITY = 0
_PAYLOAD_KEY_SIGNATURE = 1
_PAYLOAD_MAX_ENTRIES = 16
#: The bounded reader's limits for the payload (spec/transport.md §2.5): within one handshake message.
_PAYLOAD_LIMITS = ReadLimits(max_bytes=MAX_HANDSHAKE_MESSAGE_LEN, max_container=MAX_HANDSHAKE_MESSAGE_LEN)


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    AWAIT_MSG1 = "await message 1"  # responder, start
    AWAIT_MSG2 = "await message 2"  # initiator, message 1 queued
    AWAIT_MSG3 = "await message 3"  # responder, message 2 queued
    DONE = "done"
    FAILED = "failed"


# The state machine as data: (role, state) -> (number of the message awaited, state after it).
_TRANSITIONS: Final = {
    (Role.RESPONDER, State.AWAIT_MSG1): (1, State.AWAIT_MSG3),
    (Role.INITIATOR, State.AWAIT_MSG2): (2, State.DONE),
    (Role.RESPONDER, State.AWAIT_MSG3): (3, State.DONE),
}
_INITIAL_STATE: Final = {Role.INITIATOR: State.AWAIT_MSG2, Role.RESPONDER: State.AWAIT_MSG1}


class RejectReason(enum.IntEnum):
    """Why a responder rejected message 1 (spec/transport.md §2.7)."""

    SWARM_KEY_REQUIRED = 1  # responder is in a private swarm; message 1 did not authenticate
    SWARM_KEY_UNEXPECTED = 2  # responder is in a public swarm; message 1 was keyed


@dataclass(frozen=True)
class Rejection:
    """The responder's cleartext rejection: magic || reason (1) || id length (1) || protocol id."""

    reason: int
    protocol_id: str

    def encode(self) -> bytes:
        pid = self.protocol_id.encode("ascii")
        body = _REJECT_MAGIC + bytes([self.reason, len(pid)]) + pid
        return _LEN.pack(len(body)) + body

    @staticmethod
    def is_rejection(body: bytes) -> bool:
        return len(body) < _MSG2_MIN_LEN and body.startswith(_REJECT_MAGIC)

    @classmethod
    def decode(cls, body: bytes) -> Rejection:
        """Decode a frame body for which ``is_rejection`` holds."""
        n = len(_REJECT_MAGIC)
        if len(body) < n + 2 or len(body) != n + 2 + body[n + 1]:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "malformed rejection message")
        try:
            pid = body[n + 2 :].decode("ascii")
        except UnicodeDecodeError:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "rejection protocol id is not ASCII") from None
        return cls(body[n], pid)


@dataclass(frozen=True, eq=False)
class HandshakePayload(WireStruct):
    """Identity payload of messages 2 and 3: msgpack map {0: PublicKey protobuf, 1: signature}.

    The signature is Ed25519 over ``SIGNATURE_PREFIX || sender's Noise static public key``.
    Receivers ignore other integer keys (reserved for extensions); see spec/transport.md §2.5.
    Read by the package's bounded reader and this field table; every broken rule of step 1 is
    ``BAD_IDENTITY``.
    """

    ERROR_CODE: ClassVar[ErrorCode | None] = ErrorCode.BAD_IDENTITY

    identity_key: bytes = wire(_PAYLOAD_KEY_IDENTITY, Blob(0, MAX_HANDSHAKE_MESSAGE_LEN))  # libp2p PublicKey protobuf
    identity_sig: bytes = wire(_PAYLOAD_KEY_SIGNATURE, Blob(SIGNATURE_LEN, SIGNATURE_LEN))

    def encode(self) -> bytes:
        return msgpack.packb(self._encode_body(None), use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> HandshakePayload:
        """Raises RemoteProtocolError(BAD_IDENTITY) for anything but a well-formed payload."""
        try:
            obj = read_map(data, _PAYLOAD_LIMITS, what="handshake payload")
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_IDENTITY, f"handshake payload: {exc.message}") from None
        if len(obj) > _PAYLOAD_MAX_ENTRIES:
            raise RemoteProtocolError(ErrorCode.BAD_IDENTITY, f"handshake payload of {len(obj)} entries > {_PAYLOAD_MAX_ENTRIES}")
        try:
            return cls._decode_body(obj)
        except Violation as exc:
            raise RemoteProtocolError(exc.code, f"handshake payload: {exc.message}") from None


@dataclass(frozen=True)
class HandshakeResult:
    """What a finished handshake yields. ``channel`` already holds any bytes received after it."""

    remote_peer_id: PeerId
    remote_public_key: bytes  # raw 32-byte Ed25519
    remote_static_key: bytes  # raw 32-byte X25519 (Noise "rs")
    handshake_hash: bytes  # Noise h after the last message: unique per session, usable for channel binding
    protocol_name: str
    channel: SecureChannel = field(repr=False)


def sign_static_key(identity: Identity, static_public: bytes) -> bytes:
    return identity.sign(SIGNATURE_PREFIX + static_public)


class Handshake:
    """One side of one handshake. See the module docstring for the protocol and API."""

    def __init__(
        self,
        role: Role,
        identity: Identity,
        swarm_key: bytes | None,
        expected_peer_id: PeerId | None = None,
        *,
        static_key: bytes | None = None,
        ephemeral: bytes | None = None,
        rekey_interval: int = REKEY_INTERVAL,
    ) -> None:
        """``swarm_key`` None means a public swarm. ``static_key`` (X25519 private, raw 32 bytes)
        defaults to a fresh key for this handshake; a runtime MAY pass one per-process key instead
        (never stored, spec/transport.md §2.2). ``ephemeral`` and ``rekey_interval`` are for test
        vectors only: both peers must use the protocol's REKEY_INTERVAL."""
        if not isinstance(role, Role):
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "role must be a Role")
        if swarm_key is not None and len(swarm_key) != SWARM_KEY_LEN:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"swarm key must be {SWARM_KEY_LEN} bytes")
        self.role = role
        self.identity = identity
        self.keyed = swarm_key is not None
        self.expected_peer_id = expected_peer_id
        self.protocol_name = NOISE_PROTOCOL_PRIVATE if self.keyed else NOISE_PROTOCOL_PUBLIC
        self._rekey_interval = rekey_interval
        static = KeyPair(static_key)
        self._noise = HandshakeState(
            self.protocol_name,
            role is Role.INITIATOR,
            prologue=PROTOCOL_ID.encode("ascii"),
            s=static.private,
            e=ephemeral,
            psks=[bytes(swarm_key)] if swarm_key is not None else [],
        )
        self._payload = HandshakePayload(identity.public_key_proto, sign_static_key(identity, static.public)).encode()
        self.state = _INITIAL_STATE[role]
        self.error: ProtocolError | None = None
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._result: HandshakeResult | None = None
        self._remote: tuple[PeerId, bytes] | None = None
        if role is Role.INITIATOR:
            self._queue(self._noise.write_message(b""))

    # ------------------------------------------------------------------ public API

    @property
    def is_done(self) -> bool:
        return self.state is State.DONE

    @property
    def result(self) -> HandshakeResult:
        if self._result is None:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, f"handshake not done (state: {self.state.value})")
        return self._result

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer now (possibly empty). Call it after every receive_data, even one that raised."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def receive_data(self, data: bytes) -> HandshakeResult | None:
        """Feed bytes read from the peer (``b""`` = the peer closed). Returns the result once done."""
        if self.state in (State.DONE, State.FAILED):
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, f"receive_data in state {self.state.value}")
        try:
            if not data:
                raise RemoteProtocolError(
                    ErrorCode.HANDSHAKE_FAILED,
                    f"peer closed the connection during the handshake ({self.state.value})",
                )
            self._inbuf += data
            while self.state not in (State.DONE, State.FAILED):
                body = self._next_frame()
                if body is None:
                    return None
                number, next_state = _TRANSITIONS[(self.role, self.state)]
                _HANDLERS[number](self, body)
                self.state = next_state
        except ProtocolError as exc:
            self.state = State.FAILED
            self.error = exc
            self._inbuf.clear()
            raise
        return self._result

    # ------------------------------------------------------------------ framing

    def _queue(self, message: bytes) -> None:
        self._outbuf += _LEN.pack(len(message)) + message

    def _next_frame(self) -> bytes | None:
        buf = self._inbuf
        if len(buf) < 2:
            return None
        (n,) = _LEN.unpack_from(buf, 0)
        if n == 0 or n > MAX_HANDSHAKE_MESSAGE_LEN:
            raise RemoteProtocolError(
                ErrorCode.HANDSHAKE_FAILED, f"handshake message length {n} outside 1..{MAX_HANDSHAKE_MESSAGE_LEN}"
            )
        if len(buf) < 2 + n:
            return None
        body = bytes(buf[2 : 2 + n])
        del buf[: 2 + n]
        return body

    # ------------------------------------------------------------------ messages

    def _on_msg1(self, body: bytes) -> None:
        """Responder: authenticate message 1 (the PSK check), then queue message 2."""
        if len(body) < DHLEN:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, f"message 1 of {len(body)} bytes is too short")
        if not self.keyed:
            if len(body) == _MSG1_PRIVATE_LEN:
                self._reject(RejectReason.SWARM_KEY_UNEXPECTED, "peer uses a swarm key but this is a public swarm")
            if len(body) != _MSG1_PUBLIC_LEN:
                raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, f"message 1 must be 32 bytes, got {len(body)}")
        elif len(body) == _MSG1_PUBLIC_LEN:
            self._reject(RejectReason.SWARM_KEY_REQUIRED, "peer has no swarm key but this swarm is private")
        try:
            payload = self._noise.read_message(body)
        except DecryptError:
            self._reject(
                RejectReason.SWARM_KEY_REQUIRED,
                "message 1 failed to authenticate: the peer's swarm key does not match (or it speaks another version)",
            )
        if payload:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "message 1 payload must be empty")
        self._queue(self._noise.write_message(self._payload))

    def _on_msg2(self, body: bytes) -> None:
        """Initiator: a Rejection, or the responder's identity; verify it, then queue message 3."""
        if Rejection.is_rejection(body):
            self._on_rejection(Rejection.decode(body))
        try:
            payload = self._noise.read_message(body)
        except DecryptError:
            raise RemoteProtocolError(
                ErrorCode.HANDSHAKE_FAILED, "message 2 failed to authenticate (tampered, or another protocol version)"
            ) from None
        self._authenticate(payload)
        self._queue(self._noise.write_message(self._payload))
        self._finish()

    def _on_msg3(self, body: bytes) -> None:
        """Responder: verify the initiator's identity; the handshake is then complete."""
        try:
            payload = self._noise.read_message(body)
        except DecryptError:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "message 3 failed to authenticate") from None
        self._authenticate(payload)
        self._finish()

    def _reject(self, reason: RejectReason, message: str) -> None:
        self._queue_raw(Rejection(reason, PROTOCOL_ID).encode())
        raise RemoteProtocolError(ErrorCode.SWARM_KEY_MISMATCH, message)

    def _queue_raw(self, frame: bytes) -> None:
        self._outbuf += frame

    def _on_rejection(self, rej: Rejection) -> None:
        if rej.protocol_id != PROTOCOL_ID:
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer rejected the handshake: it speaks {rej.protocol_id!r}, we speak {PROTOCOL_ID!r}",
            )
        if rej.reason == RejectReason.SWARM_KEY_REQUIRED:
            why = "it is in a private swarm and our swarm key does not match" if self.keyed else (
                "it is in a private swarm and we have no swarm key"
            )
        elif rej.reason == RejectReason.SWARM_KEY_UNEXPECTED:
            why = "it is in a public swarm (no swarm key) and we use one"
        else:
            raise RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, f"peer rejected the handshake (reason {rej.reason})")
        raise RemoteProtocolError(ErrorCode.SWARM_KEY_MISMATCH, f"swarm key does not match: peer rejected us, {why}")

    def _authenticate(self, payload: bytes) -> None:
        p = HandshakePayload.decode(payload)
        try:
            public_key = decode_public_key_proto(p.identity_key)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(ErrorCode.BAD_IDENTITY, f"identity key: {exc.message}") from None
        rs = self._noise.rs
        if rs is None:  # cannot happen: XX delivers "s" before this payload
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "no remote static key")
        if not verify_signature(public_key, SIGNATURE_PREFIX + rs, p.identity_sig):
            raise RemoteProtocolError(ErrorCode.BAD_IDENTITY, "identity signature over the Noise static key is invalid")
        peer_id = PeerId.from_public_key(public_key)
        if self.expected_peer_id is not None and peer_id != self.expected_peer_id:
            raise RemoteProtocolError(
                ErrorCode.PEER_ID_MISMATCH, f"expected peer {self.expected_peer_id}, but the peer is {peer_id}"
            )
        self._remote = (peer_id, public_key)

    def _finish(self) -> None:
        c1, c2 = self._noise.split()
        send, recv = (c1, c2) if self.role is Role.INITIATOR else (c2, c1)
        channel = SecureChannel(send, recv, rekey_interval=self._rekey_interval)
        if self._inbuf:  # the initiator may send transport frames right behind message 3
            channel.receive_data(bytes(self._inbuf))
            self._inbuf.clear()
        if self._remote is None or self._noise.rs is None:
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "handshake finished without authentication")
        peer_id, public_key = self._remote
        rs = self._noise.rs
        self._result = HandshakeResult(
            peer_id, public_key, rs, self._noise.handshake_hash, self.protocol_name, channel
        )


_HANDLERS: Final = {1: Handshake._on_msg1, 2: Handshake._on_msg2, 3: Handshake._on_msg3}
