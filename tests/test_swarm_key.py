"""The IPFS swarm.key format (protocol/swarm_key.py)."""

from __future__ import annotations

import base64

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.swarm_key import SwarmKey

KEY = bytes(range(32))
HEX = KEY.hex().encode()
HEADER = b"/key/swarm/psk/1.0.0/\n"


def test_encode_is_the_ipfs_form() -> None:
    assert SwarmKey(KEY).encode() == b"/key/swarm/psk/1.0.0/\n/base16/\n" + HEX + b"\n"


def test_round_trip_generated() -> None:
    key = SwarmKey.generate()
    assert SwarmKey.parse(key.encode()) == key
    assert key != SwarmKey.generate()


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"/base16/\n" + HEX + b"\n",
        HEADER + b"/base16/\n" + HEX,  # no final newline
        HEADER + b"/base16/\n" + HEX.upper() + b"\n",
        b"/key/swarm/psk/1.0.0/\r\n/base16/\r\n" + HEX + b"\r\n",  # written on Windows
        HEADER + b"/base16/\n" + HEX + b"\n\n  \n",  # trailing blank lines
        HEADER + b"/base64/\n" + base64.b64encode(KEY) + b"\n",
        HEADER + b"/bin/\n" + KEY,
    ],
)
def test_accepted_forms(data: bytes) -> None:
    assert SwarmKey.parse(data).key == KEY


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        (b"", ErrorCode.MALFORMED, "empty"),
        (HEX + b"\n", ErrorCode.MALFORMED, "first line must be '/key/swarm/psk/1.0.0/'"),
        (b"/key/swarm/psk/2.0.0/\n/base16/\n" + HEX, ErrorCode.MALFORMED, "first line must be"),
        (b" /key/swarm/psk/1.0.0/\n/base16/\n" + HEX, ErrorCode.MALFORMED, "first line must be"),
        (b"/key/swarm/psk/1.0.0/", ErrorCode.MALFORMED, "first line (header): no newline"),
        (HEADER + b"/base16/", ErrorCode.MALFORMED, "second line (encoding): no newline"),
        (HEADER + HEX + b"\n", ErrorCode.MALFORMED, "second line must name the encoding"),
        (HEADER + b"/base32/\n" + HEX, ErrorCode.MALFORMED, "got '/base32/'"),
        (HEADER + b"/base16/\n", ErrorCode.INVALID_FIELD, "missing"),
        (HEADER + b"/base16/\n\n", ErrorCode.INVALID_FIELD, "missing"),
        (HEADER + b"/base16/\n" + HEX[:-1], ErrorCode.INVALID_FIELD, "exactly 64 hex digits, got 63"),
        (HEADER + b"/base16/\n" + HEX + b"0", ErrorCode.INVALID_FIELD, "exactly 64 hex digits, got 65"),
        (HEADER + b"/base16/\n" + HEX[:10] + b"g" + HEX[11:], ErrorCode.INVALID_FIELD, "position 11 is not a hex"),
        (HEADER + b"/base16/\n " + HEX, ErrorCode.INVALID_FIELD, "position 1 is not a hex"),
        (HEADER + b"/base16/\n" + HEX + b"\n" + HEX, ErrorCode.INVALID_FIELD, "only one key per file"),
        (HEADER + b"/base64/\n" + b"!!!!", ErrorCode.INVALID_FIELD, "not valid standard base64"),
        (HEADER + b"/base64/\n" + base64.b64encode(KEY[:31]), ErrorCode.INVALID_FIELD, "decodes to 31 bytes"),
        (HEADER + b"/bin/\n" + KEY + b"\n", ErrorCode.INVALID_FIELD, "exactly 32 raw bytes"),
        (HEADER + b"/base16/\n" + b"0" * 2000, ErrorCode.LIMIT_EXCEEDED, "swarm key file is"),
    ],
)
def test_rejections_say_what_is_wrong(data: bytes, code: ErrorCode, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError) as exc:
        SwarmKey.parse(data)
    assert exc.value.code == code
    assert fragment in exc.value.message


def test_key_is_not_in_repr_and_fingerprint_is_stable() -> None:
    key = SwarmKey(KEY)
    assert HEX.decode() not in repr(key)
    assert key.fingerprint == SwarmKey(KEY).fingerprint
    assert len(key.fingerprint) == 16 and key.fingerprint != SwarmKey(bytes(32)).fingerprint
    assert key.fingerprint in repr(key)


def test_wrong_length_key_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        SwarmKey(b"short")
