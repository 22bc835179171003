"""Generate spec/vectors/announcement.json: DHT block announcement values, valid and invalid.

Run from the repository root:  .venv/bin/python spec/vectors/generate_announcement.py
(``--check`` exits 1 if the committed file differs from what would be generated).

Lists (spec/announcement.md):

- ``valid``: canonical values. Encoding ``fields`` gives ``hex`` exactly; decoding
  ``hex`` gives ``fields``.
- ``accepted``: non-canonical encodings a reader MUST accept (keys out of order, longer
  integer formats, float 32, nil for an absent field, unknown keys): decoding ``hex``
  gives ``fields``.
- ``invalid``: decoding ``hex`` fails with exactly ``error``; ``rule`` names the rule.

``fields`` is ``{"format": 1, "state": 0|1|2, "start", "end", "inference_tps",
"forward_tps", "cache_tokens_left", "dtype", "quant", "version"[, "addrs": [...]][, "adapters": [...]]}``
(``addrs`` and ``adapters`` left out when absent). Invalid and accepted bytes are written with
msgpack-python directly (plus byte surgery), not with the codec under test.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

from biopetals.protocol.announcement import Announcement, State, encode_announcement

OUT = Path(__file__).with_name("announcement.json")

PEER = "12D3KooWKCtS9ZkXQ2ts6bMk3TZhhRfXsY39eAB2BrdQa5RMifXy"
ADDR = f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}"
ADDR6 = f"/ip6/fd00::5/tcp/31337/p2p/{PEER}"

BASE: dict[str, Any] = {
    "format": 1,
    "state": 1,
    "start": 0,
    "end": 16,
    "inference_tps": 12.5,
    "forward_tps": 2048.0,
    "cache_tokens_left": 16384,
    "dtype": "bfloat16",
    "quant": "none",
    "version": "biopetals/0.1.0",
    "addrs": [ADDR],
}
KEYS = {"format": 0, "state": 1, "start": 2, "end": 3, "inference_tps": 4, "forward_tps": 5,
        "cache_tokens_left": 6, "dtype": 7, "quant": 8, "version": 9, "addrs": 10, "adapters": 11}


def fields_to_announcement(fields: dict) -> Announcement:
    return Announcement(
        state=State(fields["state"]),
        start=fields["start"],
        end=fields["end"],
        inference_tps=fields["inference_tps"],
        forward_tps=fields["forward_tps"],
        cache_tokens_left=fields["cache_tokens_left"],
        dtype=fields["dtype"],
        quant=fields["quant"],
        version=fields["version"],
        addrs=tuple(fields.get("addrs", ())),
        adapters=tuple(fields.get("adapters", ())),
    )


def announcement_to_fields(a: Announcement) -> dict:
    fields = {
        "format": 1,
        "state": int(a.state),
        "start": a.start,
        "end": a.end,
        "inference_tps": a.inference_tps,
        "forward_tps": a.forward_tps,
        "cache_tokens_left": a.cache_tokens_left,
        "dtype": a.dtype,
        "quant": a.quant,
        "version": a.version,
    }
    if a.addrs:
        fields["addrs"] = [str(x) for x in a.addrs]
    if a.adapters:
        fields["adapters"] = list(a.adapters)
    return fields


def body(fields: dict) -> dict:
    """The msgpack map of ``fields`` (ascending keys)."""
    return {KEYS[name]: value for name, value in fields.items()}


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def with_(**changes: Any) -> dict:
    out = {KEYS[k]: v for k, v in BASE.items()}
    for name, value in changes.items():
        if value is _DROP:
            out.pop(KEYS[name], None)
        else:
            out[KEYS[name]] = value
    return dict(sorted(out.items()))


_DROP = object()


def valid() -> list[dict]:
    cases = [
        ("online with one address", dict(BASE)),
        ("joining, no addresses", {**{k: v for k, v in BASE.items() if k != "addrs"}, "state": 0,
                                   "inference_tps": 0.0, "forward_tps": 0.0, "cache_tokens_left": 0}),
        ("offline", {**BASE, "state": 2, "cache_tokens_left": 0}),
        ("largest span and counters", {**BASE, "start": 1023, "end": 1024, "cache_tokens_left": 2**64 - 1,
                                       "inference_tps": 1e300, "addrs": [ADDR, ADDR6]}),
        ("eight addresses", {**BASE, "start": 30, "end": 32, "dtype": "float32", "quant": "nf4",
                             "addrs": [f"/ip4/10.0.0.{i}/tcp/31337/p2p/{PEER}" for i in range(1, 9)]}),
        ("label of 64 bytes", {**BASE, "version": "v" * 64, "quant": "int8"}),
        ("server-side adapters", {**BASE, "adapters": ["bio-lora", "a" * 64]}),
    ]
    out = []
    for name, fields in cases:
        data = encode_announcement(fields_to_announcement(fields))
        assert data == pack(body(fields)), name  # the codec agrees with a plain msgpack writer
        out.append({"name": name, "fields": fields, "hex": data.hex()})
    return out


def accepted() -> list[dict]:
    fields = dict(BASE)
    canonical = body(fields)
    reordered = dict(reversed(list(canonical.items())))
    unknown = {**canonical, 12: "a field of a later revision", 200: [1, 2, 3]}
    nil_addrs = {**body({k: v for k, v in BASE.items() if k != "addrs"}), 10: None}
    empty_addrs = {**body({k: v for k, v in BASE.items() if k != "addrs"}), 10: []}
    # start as uint 16 (cd 00 00) instead of a fixint; tps as float 32
    long_int = pack(canonical).replace(bytes([0x02, 0x00]), bytes([0x02, 0xCD, 0x00, 0x00]), 1)
    f32 = pack(canonical).replace(b"\x04\xcb" + struct.pack(">d", 12.5), b"\x04\xca" + struct.pack(">f", 12.5), 1)
    no_addrs = {k: v for k, v in BASE.items() if k != "addrs"}
    return [
        {"name": "keys in descending order", "fields": fields, "hex": pack(reordered).hex()},
        {"name": "unknown keys are ignored", "fields": fields, "hex": pack(unknown).hex()},
        {"name": "nil for absent addrs", "fields": no_addrs, "hex": pack(nil_addrs).hex()},
        {"name": "empty addrs array", "fields": no_addrs, "hex": pack(empty_addrs).hex()},
        {"name": "integer in a longer format", "fields": fields, "hex": long_int.hex()},
        {"name": "float 32 throughput", "fields": fields, "hex": f32.hex()},
    ]


def invalid() -> list[dict]:
    good = pack(with_())
    cases: list[tuple[str, bytes, str, str]] = [
        ("longer than MAX_ANNOUNCEMENT_BYTES", pack(with_(version="v" * 64, addrs=["/ip4/10.0.0.1/tcp/1/" + "x" * 200] * 5)), "LIMIT_EXCEEDED", "§3 step 1"),
        ("empty input", b"", "MALFORMED", "§3 step 2 truncated"),
        ("truncated", good[:-3], "MALFORMED", "§3 step 2 truncated"),
        ("reserved byte 0xc1", b"\xc1", "MALFORMED", "§3 step 2 reserved byte"),
        ("trailing bytes", good + b"\x00", "MALFORMED", "§3 step 2 trailing bytes"),
        ("too many objects", pack({**with_(), 11: [0] * 120}), "LIMIT_EXCEEDED", "§3 step 2 MAX_ANNOUNCEMENT_OBJECTS"),
        ("too deep", pack(with_(addrs=[[ADDR]])), "LIMIT_EXCEEDED", "§3 step 2 MAX_ANNOUNCEMENT_DEPTH"),
        ("container too large", pack({0: 1, 11: list(range(300))}), "LIMIT_EXCEEDED", "§3 step 2 MAX_ANNOUNCEMENT_CONTAINER"),
        ("str longer than the container bound", pack(with_(addrs=["/" + "a" * 299])), "LIMIT_EXCEEDED", "§3 step 2 MAX_ANNOUNCEMENT_CONTAINER"),
        ("invalid UTF-8", pack(with_()).replace(b"\xa4none", b"\xa4n\xffne", 1), "MALFORMED", "§3 step 3 UTF-8"),
        ("string key", pack({**with_(), "x": 1}), "MALFORMED", "§3 step 3 key not a uint"),
        ("negative key", pack({**with_(), -1: 1}), "MALFORMED", "§3 step 3 key not a uint"),
        ("duplicate key", good[:1].replace(b"\x8b", b"\x8c") + good[1:] + b"\x01\x02", "MALFORMED", "§3 step 3 duplicate key"),
        ("not a map", pack([1, 1, 0, 16]), "MALFORMED", "§3 step 3 not a map"),
        ("format absent", pack({k: v for k, v in with_().items() if k != 0}), "MALFORMED", "§3 step 4"),
        ("format not a uint", pack(with_(format="1")), "MALFORMED", "§3 step 4"),
        ("format 2", pack(with_(format=2)), "UNSUPPORTED_VERSION", "§3 step 4"),
        ("format 0", pack(with_(format=0)), "UNSUPPORTED_VERSION", "§3 step 4"),
        ("state unknown", pack(with_(state=3)), "INVALID_FIELD", "§2 state range"),
        ("state bool", pack(with_(state=True)), "INVALID_FIELD", "§2 state type"),
        ("start at MAX_BLOCKS", pack(with_(start=1024, end=1024)), "INVALID_FIELD", "§2 start range"),
        ("end 0", pack(with_(end=0)), "INVALID_FIELD", "§2 end range"),
        ("end over MAX_BLOCKS", pack(with_(end=1025)), "INVALID_FIELD", "§2 end range"),
        ("start equals end", pack(with_(start=16, end=16)), "INVALID_FIELD", "§2 cross-field start < end"),
        ("inference_tps negative", pack(with_(inference_tps=-1.0)), "INVALID_FIELD", "§2 inference_tps range"),
        ("inference_tps NaN", pack(with_(inference_tps=float("nan"))), "INVALID_FIELD", "§2 inference_tps finite"),
        ("forward_tps infinite", pack(with_(forward_tps=float("inf"))), "INVALID_FIELD", "§2 forward_tps finite"),
        ("forward_tps integer", pack(with_(forward_tps=2048)), "INVALID_FIELD", "§2 forward_tps type"),
        ("cache_tokens_left negative", pack(with_(cache_tokens_left=-1)), "INVALID_FIELD", "§2 cache_tokens_left range"),
        ("cache_tokens_left float", pack(with_(cache_tokens_left=1.0)), "INVALID_FIELD", "§2 cache_tokens_left type"),
        ("dtype empty", pack(with_(dtype="")), "INVALID_FIELD", "§2 dtype range"),
        ("dtype too long", pack(with_(dtype="d" * 65)), "LIMIT_EXCEEDED", "§2 dtype range"),
        ("quant bytes", pack(with_(quant=b"none")), "INVALID_FIELD", "§2 quant type"),
        ("version too long", pack(with_(version="v" * 65)), "LIMIT_EXCEEDED", "§2 version range"),
        ("state absent", pack(with_(state=_DROP)), "INVALID_FIELD", "§2 state required"),
        ("end absent", pack(with_(end=_DROP)), "INVALID_FIELD", "§2 end required"),
        ("version absent", pack(with_(version=_DROP)), "INVALID_FIELD", "§2 version required"),
        ("addrs not an array", pack(with_(addrs=ADDR)), "INVALID_FIELD", "§2 addrs type"),
        ("nine addrs", pack(with_(addrs=["/ip4/1.2.3.4/tcp/1"] * 9)), "LIMIT_EXCEEDED", "§2 addrs MAX_ANNOUNCED_ADDRS"),
        ("addr empty", pack(with_(addrs=[""])), "INVALID_FIELD", "§2 addrs item range"),
        ("addr not a str", pack(with_(addrs=[1])), "INVALID_FIELD", "§2 addrs item type"),
        ("adapters not an array", pack(with_(adapters="bio")), "INVALID_FIELD", "§2 adapters type"),
        ("nine adapters", pack(with_(adapters=[f"a{i}" for i in range(9)])), "LIMIT_EXCEEDED", "§2 adapters MAX_ADAPTERS"),
        ("adapter name empty", pack(with_(adapters=[""])), "INVALID_FIELD", "§2 adapters item range"),
        ("adapter name too long", pack(with_(adapters=["a" * 65])), "LIMIT_EXCEEDED", "§2 adapters item range"),
    ]
    return [{"name": n, "hex": h.hex(), "error": e, "rule": r} for n, h, e, r in cases]


def generate() -> dict:
    return {
        "spec": "spec/announcement.md",
        "revision": 1,
        "description": "Values of DHT block announcements (spec/announcement.md): canonical valid values, "
        "accepted non-canonical encodings, and invalid values with the error code of the first rule broken.",
        "valid": valid(),
        "accepted": accepted(),
        "invalid": invalid(),
    }


def main() -> int:
    text = json.dumps(generate(), indent=1, ensure_ascii=False) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.exists() and OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
