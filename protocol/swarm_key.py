"""The IPFS ``swarm.key`` file format: a private swarm's 32-byte pre-shared key.

See spec/transport.md §1.6 (rules S1-S3). The format is go-libp2p's (``core/pnet``)::

    /key/swarm/psk/1.0.0/\\n
    /base16/\\n
    <64 hex digits>\\n

We always write that form. On reading we also accept what go-libp2p accepts so a
kubo/ipfs-cluster key works unchanged: ``\\r\\n`` line ends, upper-case hex, the
``/base64/`` and ``/bin/`` encodings. We are stricter than go-libp2p in one way: it
ignores anything after the key, we reject it (only trailing whitespace is allowed),
so a file with two keys pasted in is an error rather than a silent choice.

Pure: parsing and formatting only; reading the file is ``transport/keyfiles.py``.
Errors are ``RemoteProtocolError`` with MALFORMED (header lines) or INVALID_FIELD
(the key itself), and a message saying exactly what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from dataclasses import dataclass, field

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["SwarmKey", "SWARM_KEY_HEADER", "SWARM_KEY_LEN", "MAX_SWARM_KEY_FILE_LEN"]

SWARM_KEY_HEADER = b"/key/swarm/psk/1.0.0/"
SWARM_KEY_LEN = 32
# A valid file is 88-90 bytes; the limit only keeps a wrong file (say, a model
# shard passed by mistake) from being read whole.
MAX_SWARM_KEY_FILE_LEN = 1024
_ENCODINGS = (b"/base16/", b"/base64/", b"/bin/")
_WHITESPACE = b" \t\r\n"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def _show(line: bytes, limit: int = 40) -> str:
    text = repr(line[:limit])[2:-1]  # bytes repr without b'...'
    return f"'{text}…'" if len(line) > limit else f"'{text}'"


@dataclass(frozen=True)
class SwarmKey:
    """A 32-byte pre-shared swarm key. Secret: ``repr`` shows only the fingerprint."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != SWARM_KEY_LEN:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "a swarm key is exactly 32 bytes")

    @classmethod
    def generate(cls) -> SwarmKey:
        return cls(secrets.token_bytes(SWARM_KEY_LEN))

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key in logs without revealing it."""
        return hashlib.sha256(b"biopetals swarm key fingerprint\x00" + self.key).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"SwarmKey(fingerprint={self.fingerprint!r})"

    def encode(self) -> bytes:
        """The file contents, base16 form (always what we write)."""
        return SWARM_KEY_HEADER + b"\n/base16/\n" + self.key.hex().encode("ascii") + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> SwarmKey:
        """Parse swarm.key file contents; RemoteProtocolError says what is wrong."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, "swarm key file contents must be bytes")
        data = bytes(data)
        if len(data) > MAX_SWARM_KEY_FILE_LEN:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"swarm key file is {len(data)} bytes; a swarm key file is under {MAX_SWARM_KEY_FILE_LEN}",
            )
        if not data:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "swarm key file is empty")
        header, rest = _next_line(data, "first line (header)")
        if header != SWARM_KEY_HEADER:
            raise RemoteProtocolError(
                ErrorCode.MALFORMED,
                f"first line must be '{SWARM_KEY_HEADER.decode()}', got {_show(header)}",
            )
        encoding, body = _next_line(rest, "second line (encoding)")
        if encoding == b"/base16/":
            return cls(_parse_base16(body))
        if encoding == b"/base64/":
            return cls(_parse_base64(body))
        if encoding == b"/bin/":
            if len(body) != SWARM_KEY_LEN:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_FIELD,
                    f"/bin/ key must be exactly 32 raw bytes after the encoding line, got {len(body)}",
                )
            return cls(body)
        raise RemoteProtocolError(
            ErrorCode.MALFORMED,
            f"second line must name the encoding ('/base16/', '/base64/' or '/bin/'), got {_show(encoding)}",
        )


def _next_line(data: bytes, what: str) -> tuple[bytes, bytes]:
    line, newline, rest = data.partition(b"\n")
    if not newline:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"swarm key file ends inside its {what}: no newline")
    return line.removesuffix(b"\r"), rest


def _key_text(body: bytes, encoding: str) -> bytes:
    text = body.rstrip(_WHITESPACE)
    if not text:
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"third line must hold the key ({encoding}); it is missing")
    if b"\n" in text:
        raise RemoteProtocolError(
            ErrorCode.INVALID_FIELD, f"unexpected data after the key line ({encoding}): only one key per file"
        )
    return text


def _parse_base16(body: bytes) -> bytes:
    text = _key_text(body, "base16")
    for i, ch in enumerate(text):
        if ch not in _HEX_DIGITS:
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD,
                f"key line: character {bytes([ch])!r} at position {i + 1} is not a hex digit",
            )
    if len(text) != 2 * SWARM_KEY_LEN:
        raise RemoteProtocolError(
            ErrorCode.INVALID_FIELD, f"key line must be exactly 64 hex digits, got {len(text)}"
        )
    return bytes.fromhex(text.decode("ascii"))


def _parse_base64(body: bytes) -> bytes:
    text = _key_text(body, "base64")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, "key line is not valid standard base64") from None
    if len(key) != SWARM_KEY_LEN:
        raise RemoteProtocolError(
            ErrorCode.INVALID_FIELD, f"base64 key line decodes to {len(key)} bytes, expected 32"
        )
    return key
