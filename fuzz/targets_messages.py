"""Fuzz targets for the node protocol's message codec (spec/messages.md §2.5).

Invariant (h11's): any input is either decoded or raises RemoteProtocolError. Extra checks
turn silent misbehaviour into crashes:

- ``decode_message``: a decoded message re-encodes (canonically) to bytes that decode to
  an equal message, and that re-encoding is a fixed point;
- ``decode_message_as_node``: the same decoder restricted to what a node accepts on a
  session stream (``Step``, ``CloseSession``), as the node calls it;
- ``decode_message_mutated``: a valid vector's msgpack object with one value (chosen
  by the first bytes) replaced by the msgpack object the remaining bytes spell; this
  reaches field, hop and tensor rules that random bytes rarely get to;
- ``scan_msgpack``: the structure scan alone; whenever it accepts, msgpack-python parses
  the same bytes as exactly one object, with no more objects than the scan counted.
  (It found that msgpack-python rejects reserved ext types and out-of-range timestamps
  the scan let through; the spec now forbids ext formats outright.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import msgpack

from biopetals.protocol.envelope import scan_msgpack
from biopetals.protocol.messages import CloseSession, Step, decode_message, encode_message


def _decode(data: bytes, expected: tuple | None) -> None:
    message = decode_message(data, expected)
    again = encode_message(message)
    decoded_again = decode_message(again, expected)
    if decoded_again != message:
        raise AssertionError(f"re-encoded {type(message).__name__} decodes to a different message")
    if encode_message(decoded_again) != again:
        raise AssertionError("canonical encoding is not a fixed point")


def decode_message_any(data: bytes) -> None:
    _decode(data, None)


def decode_message_as_node(data: bytes) -> None:
    _decode(data, (Step, CloseSession))


def _count(obj: object) -> int:
    if isinstance(obj, dict):
        return 1 + sum(_count(k) + _count(v) for k, v in obj.items())
    if isinstance(obj, list):
        return 1 + sum(_count(v) for v in obj)
    return 1


def scan(data: bytes) -> None:
    count = scan_msgpack(data)
    try:
        obj = msgpack.unpackb(data, raw=True, strict_map_key=False, use_list=True)
    except msgpack.ExtraData:
        raise AssertionError("scan accepted trailing bytes") from None
    except TypeError:
        return  # an unhashable map key (array or map as key): the message parser rejects it (MALFORMED)
    except ValueError as exc:
        raise AssertionError(f"scan accepted what msgpack rejects: {exc}") from None
    # Duplicate keys collapse in a dict, so the parsed count can only be lower.
    if _count(obj) > count:
        raise AssertionError(f"scan counted {count} objects, msgpack built {_count(obj)}")


_VECTORS = json.loads((Path(__file__).resolve().parent.parent / "spec/vectors/messages.json").read_text())
_BASES = [
    msgpack.unpackb(bytes.fromhex(v["hex"]), strict_map_key=False, raw=False)
    for v in _VECTORS["valid"] + _VECTORS["accepted"]
]


def _slots(obj: object, out: list) -> list:
    """Every (container, key) pair whose value can be replaced, depth first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append((obj, key))
        _slots(value, out)
    return out


def decode_message_mutated(data: bytes) -> None:
    if len(data) < 2:
        return
    base = copy.deepcopy(_BASES[data[0] % len(_BASES)])
    container, key = (slots := _slots(base, []))[data[1] % len(slots)]
    try:
        container[key] = msgpack.unpackb(data[2:], strict_map_key=False, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        container[key] = bytes(data[2:])  # not msgpack: use the bytes as a bin value
    try:
        payload = msgpack.packb(base, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return  # nothing msgpack can write
    _decode(payload, None)


TARGETS = {
    "decode_message_mutated": (decode_message_mutated, ["messages.json"]),
    "decode_message": (decode_message_any, ["messages.json"]),
    "decode_message_as_node": (decode_message_as_node, ["messages.json"]),
    "scan_msgpack": (scan, ["messages.json"]),
}
