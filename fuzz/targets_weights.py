"""Fuzz targets of the weights codecs (spec/weights.md §2.5, §3, §4.2).

Invariant: any input is either decoded or raises RemoteProtocolError. What decodes is
re-encoded where an encoder exists: a message or provider record re-encodes canonically
to bytes that decode to an equal value, and that encoding is a fixed point; a manifest's
parsed values re-encode (canonical JSON) to a manifest that parses to the same parts.
"""

from __future__ import annotations

import json

from biopetals.protocol.errors import ErrorCode, LocalProtocolError
from biopetals.protocol.manifest import encode_manifest, parse_manifest
from biopetals.protocol.weights import (
    decode_provider,
    decode_weights_message,
    encode_provider,
    encode_weights_message,
)


def decode_message(data: bytes) -> None:
    message = decode_weights_message(data)
    again = encode_weights_message(message)
    if decode_weights_message(again) != message:
        raise AssertionError("re-encoded weights message decodes to a different value")
    if encode_weights_message(decode_weights_message(again)) != again:
        raise AssertionError("canonical encoding is not a fixed point")


def decode_provider_record(data: bytes) -> None:
    record = decode_provider(data)
    try:
        again = encode_provider(record)
    except LocalProtocolError as exc:
        if exc.code == ErrorCode.LIMIT_EXCEEDED:  # a non-canonical input may re-encode longer
            return
        raise
    if decode_provider(again) != record:
        raise AssertionError("re-encoded provider record decodes to a different value")
    if encode_provider(decode_provider(again)) != again:
        raise AssertionError("canonical encoding is not a fixed point")


def parse_manifest_bytes(data: bytes) -> None:
    manifest = parse_manifest(data)
    document = json.loads(data.decode("utf-8"))
    try:
        canonical = encode_manifest(document)
    except LocalProtocolError:
        # Python's JSON reader accepts what the canonical writer refuses (a number that overflows
        # to infinity, a lone surrogate): parse_manifest let it through, so it is not a crash here.
        return
    again = parse_manifest(canonical)
    if again.parts != manifest.parts or again.name != manifest.name or again.chunk_size != manifest.chunk_size:
        raise AssertionError("the canonical form of a manifest parses to other parts")
    if encode_manifest(json.loads(canonical)) != canonical:
        raise AssertionError("canonical manifest encoding is not a fixed point")


TARGETS = {
    "decode_weights_message": (decode_message, ["weights.json"]),
    "decode_provider": (decode_provider_record, ["weights.json"]),
    "parse_manifest": (parse_manifest_bytes, ["weights.json"]),
}
