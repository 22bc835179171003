"""Fuzz target for the DHT block announcement codec (spec/announcement.md §3).

Invariant: any input is either decoded or raises RemoteProtocolError. A decoded value
re-encodes canonically to bytes that decode to an equal announcement, and that
re-encoding is a fixed point. (A value read with float 32 throughputs can re-encode up
to 8 bytes longer, past MAX_ANNOUNCEMENT_BYTES: the encoder then refuses it, which is
not a decoder bug.)
"""

from __future__ import annotations

from biopetals.protocol.announcement import decode_announcement, encode_announcement
from biopetals.protocol.errors import ErrorCode, LocalProtocolError


def decode(data: bytes) -> None:
    announcement = decode_announcement(data)
    try:
        again = encode_announcement(announcement)
    except LocalProtocolError as exc:
        if exc.code == ErrorCode.LIMIT_EXCEEDED:
            return
        raise
    if decode_announcement(again) != announcement:
        raise AssertionError("re-encoded announcement decodes to a different value")
    if encode_announcement(decode_announcement(again)) != again:
        raise AssertionError("canonical encoding is not a fixed point")


TARGETS = {"decode_announcement": (decode, ["announcement.json"])}
