"""The post-handshake secure channel: Noise transport messages as length-prefixed frames (sans-IO).

See spec/transport.md §2.8 ("Secure channel"). The channel carries a *byte stream*: ``encrypt``
splits any plaintext into frames of at most ``MAX_FRAME_PLAINTEXT`` (65535 - 16) bytes, each

    length (2 bytes, big-endian, 16..65535) || ChaChaPoly ciphertext with its 16-byte tag

encrypted with the sending CipherState (nonce n = 0, 1, 2, ... per direction, empty associated
data). Every ``REKEY_INTERVAL`` frames in one direction both sides apply Noise ``Rekey()`` to that
direction's key, deterministically, so no key ever encrypts more than 2^16 frames (4 GiB) and the
64-bit nonce is never near exhaustion.

API (h11 style, no I/O)::

    ch = SecureChannel(send_cipher, recv_cipher)     # normally HandshakeResult.channel
    wire = ch.encrypt(b"...")                        # bytes to write to the socket
    ch.receive_data(chunk)                           # bytes read from the socket; b"" = EOF
    while (pt := ch.next_plaintext()) is not None:   # one frame's plaintext at a time
        ...
    ch.receive_frames(chunk, handle)                 # both at once, ``chunk`` only borrowed (hot path)

A frame that fails to authenticate raises ``RemoteProtocolError(FRAME_AUTH_FAILED)`` and the
channel is dead (every later call raises ``LocalProtocolError``): the connection must be closed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Final

from cryptography.exceptions import InvalidTag

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.noise import _NONCE, MAX_MESSAGE_LEN, MAX_NONCE, TAGLEN, CipherState, DecryptError

__all__ = ["SecureChannel", "SecureChannelStatistics", "MAX_FRAME_PLAINTEXT", "REKEY_INTERVAL", "FRAME_HEADER_LEN"]

#: Length prefix of every frame (spec/transport.md §2.8).
FRAME_HEADER_LEN: Final = 2
#: Largest plaintext in one frame: a Noise message is at most 65535 bytes including the tag.
MAX_FRAME_PLAINTEXT: Final = MAX_MESSAGE_LEN - TAGLEN
#: Frames per direction between two Noise ``Rekey()`` calls (spec/transport.md §2.9).
REKEY_INTERVAL: Final = 1 << 16
#: Compact the receive buffer once this many consumed bytes sit in front of it.
_COMPACT_AT = 1 << 20

_HDR = struct.Struct(">H")
#: ChaChaPoly nonce of Noise n (spec/transport.md §2.8): packed here, not through CipherState, on the hot path.
_pack_nonce = _NONCE.pack


@dataclass(frozen=True)
class SecureChannelStatistics:
    frames_sent: int
    frames_received: int
    buffered_bytes: int  # received but not yet decrypted


class SecureChannel:
    """Encrypts outgoing bytes into frames and decrypts incoming frames. See the module docstring."""

    __slots__ = ("_send", "_recv", "_rekey_interval", "_buf", "_pos", "_eof", "_dead", "_sent", "_received")

    def __init__(self, send: CipherState, recv: CipherState, *, rekey_interval: int = REKEY_INTERVAL) -> None:
        if not (send.has_key() and recv.has_key()):
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "SecureChannel needs keyed CipherStates")
        if rekey_interval < 1:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "rekey_interval must be >= 1")
        self._send = send
        self._recv = recv
        # Both peers MUST use the same interval; only tests pass anything but REKEY_INTERVAL.
        self._rekey_interval = rekey_interval
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._dead = False
        self._sent = 0
        self._received = 0

    # ------------------------------------------------------------------ sending

    def encrypt(self, plaintext: bytes | bytearray | memoryview) -> bytes | bytearray:
        """Return the frames carrying ``plaintext`` (``b""`` for an empty plaintext).

        The result is a fresh buffer owned by the caller (a bytearray when several frames are needed).
        """
        if self._dead:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "secure channel already failed")
        total = len(plaintext) if type(plaintext) is bytes else memoryview(plaintext).nbytes
        if total == 0:
            return b""
        send = self._send
        if total <= MAX_FRAME_PLAINTEXT:
            # One frame (every small RPC): the AEAD allocates the ciphertext, one join adds the header.
            # CipherState.encrypt_with_ad inlined (same nonce rule, Noise §5.1): two calls less per frame.
            n = send.n
            if n >= MAX_NONCE:
                raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, "nonce exhausted: the channel must be re-established")
            ciphertext = send._aead.encrypt(_pack_nonce(n), plaintext, None)
            n += 1
            send.n = n
            self._sent += 1
            if n % self._rekey_interval == 0:
                send.rekey()
            return _HDR.pack(len(ciphertext)) + ciphertext
        src = memoryview(plaintext).cast("B")
        nframes = -(-total // MAX_FRAME_PLAINTEXT)
        out = bytearray(total + nframes * (FRAME_HEADER_LEN + TAGLEN))
        dst = memoryview(out)
        interval = self._rekey_interval
        pack_into = _HDR.pack_into
        off = 0
        for start in range(0, total, MAX_FRAME_PLAINTEXT):
            chunk = src[start : start + MAX_FRAME_PLAINTEXT]
            clen = len(chunk) + TAGLEN
            pack_into(out, off, clen)
            off += FRAME_HEADER_LEN
            send.encrypt_into(None, chunk, dst[off : off + clen])
            off += clen
            if send.n % interval == 0:
                send.rekey()
        self._sent += nframes
        dst.release()
        return out  # the caller owns it; copying megabytes into a bytes object would cost more than the AEAD

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._dead:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "secure channel already failed")
        if self._eof:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "receive_data after EOF")
        if not data:
            self._eof = True
            return
        if self._pos and (self._pos == len(self._buf) or self._pos >= _COMPACT_AT):
            del self._buf[: self._pos]
            self._pos = 0
        # Copied, not kept: asyncio reads into 256 KiB blocks shrunk to fit, and holding one
        # until the next read defeats malloc's reuse of it (measured: recv() 10x slower).
        self._buf += data

    def receive_frames(self, data: bytes | bytearray | memoryview, handle: Callable[[bytes], object]) -> None:
        """``receive_data(data)``, then ``handle(plaintext)`` for every complete frame, in order.

        The receive hot path: ``data`` is only borrowed (the caller may reuse it once this
        returns). Whole frames are decrypted straight out of it when nothing is buffered, so
        only a trailing partial frame is copied. Raises as ``receive_data`` and
        ``next_plaintext`` do, and lets whatever ``handle`` raises through (later frames
        are then left undecrypted).
        """
        if self._pos == len(self._buf) and not self._dead and not self._eof:
            # The usual read: exactly one whole frame, nothing buffered before it.
            size = len(data)
            if size > FRAME_HEADER_LEN and (data[0] << 8 | data[1]) == size - FRAME_HEADER_LEN >= TAGLEN:
                recv = self._recv
                n = recv.n
                if n < MAX_NONCE:
                    try:
                        plaintext = recv._aead.decrypt(_pack_nonce(n), data[FRAME_HEADER_LEN:], None)
                    except InvalidTag:
                        self._fail(RemoteProtocolError(ErrorCode.FRAME_AUTH_FAILED, f"frame {self._received} failed to authenticate"))
                    recv.n = n = n + 1
                    self._received += 1
                    if n % self._rekey_interval == 0:
                        recv.rekey()
                    handle(plaintext)
                    return
        if self._dead or self._eof or not data or self._pos != len(self._buf):
            self.receive_data(data)  # raises if dead; EOF; or a partial frame is waiting: append
            while (plaintext := self.next_plaintext()) is not None:
                handle(plaintext)
            return
        recv, interval = self._recv, self._rekey_interval
        view = data if type(data) is memoryview and data.format == "B" and data.ndim == 1 else memoryview(data).cast("B")
        end = len(view)
        pos = 0
        while end - pos >= FRAME_HEADER_LEN:
            (clen,) = _HDR.unpack_from(view, pos)
            if clen < TAGLEN:
                self._fail(RemoteProtocolError(ErrorCode.FRAME_AUTH_FAILED, f"frame length {clen} < 16-byte tag"))
            start = pos + FRAME_HEADER_LEN
            stop = start + clen
            if stop > end:
                break
            # CipherState.decrypt_with_ad inlined (clen >= TAGLEN checked above; n advances only
            # after a tag verifies, Noise §5.1): two calls less per frame.
            n = recv.n
            if n >= MAX_NONCE:
                self._fail(RemoteProtocolError(ErrorCode.HANDSHAKE_FAILED, "nonce exhausted: the channel must be re-established"))
            try:
                plaintext = recv._aead.decrypt(_pack_nonce(n), view[start:stop], None)
            except InvalidTag:
                self._fail(RemoteProtocolError(ErrorCode.FRAME_AUTH_FAILED, f"frame {self._received} failed to authenticate"))
            n += 1
            recv.n = n
            pos = stop
            self._received += 1
            if n % interval == 0:
                recv.rekey()
            handle(plaintext)
        if pos < end:  # a partial frame: keep a copy until the rest arrives
            buf = self._buf
            if self._pos:
                buf.clear()
                self._pos = 0
            buf += view[pos:end]

    def next_plaintext(self) -> bytes | None:
        """The next frame's plaintext, or None until a whole frame is buffered.

        Raises RemoteProtocolError: FRAME_AUTH_FAILED if a frame fails to authenticate or declares
        a length below 16; CONNECTION_CLOSED if the peer closed in the middle of a frame.
        """
        if self._dead:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "secure channel already failed")
        buf, pos = self._buf, self._pos
        avail = len(buf) - pos
        if avail < FRAME_HEADER_LEN:
            if self._eof and avail:
                self._fail(RemoteProtocolError(ErrorCode.CONNECTION_CLOSED, "peer closed inside a frame header"))
            return None
        (clen,) = _HDR.unpack_from(buf, pos)
        if clen < TAGLEN:
            self._fail(RemoteProtocolError(ErrorCode.FRAME_AUTH_FAILED, f"frame length {clen} < 16-byte tag"))
        if avail < FRAME_HEADER_LEN + clen:
            if self._eof:
                self._fail(RemoteProtocolError(ErrorCode.CONNECTION_CLOSED, "peer closed inside a frame"))
            return None
        start = pos + FRAME_HEADER_LEN
        # The view is a temporary: CPython releases it (and the bytearray's export, which would
        # block resizing it) as soon as the call returns; _fail replaces the buffer, never resizes it.
        try:
            plaintext = self._recv.decrypt_with_ad(None, memoryview(buf)[start : start + clen])
        except DecryptError:
            self._fail(RemoteProtocolError(ErrorCode.FRAME_AUTH_FAILED, f"frame {self._received} failed to authenticate"))
        except RemoteProtocolError as exc:  # nonce exhaustion
            self._fail(exc)
        self._pos = start + clen
        self._received += 1
        if self._recv.n % self._rekey_interval == 0:
            self._recv.rekey()
        return plaintext

    def statistics(self) -> SecureChannelStatistics:
        return SecureChannelStatistics(self._sent, self._received, len(self._buf) - self._pos)

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._dead = True
        self._buf = bytearray()
        self._pos = 0
        raise exc
