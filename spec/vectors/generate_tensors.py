"""Generate spec/vectors/tensors.json and spec/vectors/frames.json (spec/tensors.md §9).

The bytes are built here independently of biopetals.protocol: msgpack for the map,
``struct`` for the little-endian elements, python-zstandard for the zstd frames, and
hand-assembled bytes for every malformed case. tests/test_vectors_tensors.py then
checks the reference codec against these files in both directions.

Run from the repository root:  .venv/bin/python spec/vectors/generate_tensors.py
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import msgpack
import zstandard

HERE = Path(__file__).resolve().parent

# Values copied from spec/tensors.md §2 (kept literal so the vectors do not follow a code change silently).
MAX_TENSOR_ELEMENTS = 1 << 24
MAX_TENSOR_DIMS = 8
MAX_FRAME_BYTES = 128 << 20
MAX_MSGPACK_CONTAINER = 1024
ZSTD_LEVEL = 1

F16_MAX = 65504.0
F16_MIN_SUBNORMAL = 2.0**-24
F16_MIN_NORMAL = 2.0**-14
BF16_MIN_SUBNORMAL = 2.0**-133
F32_MIN_SUBNORMAL = 2.0**-149
F32_MAX = struct.unpack("<f", bytes.fromhex("ffff7f7f"))[0]
THIRD_F32 = struct.unpack("<f", struct.pack("<f", 1 / 3))[0]
PI_BF16 = 3.140625

# ---------------------------------------------------------------- element encoders


def _special(value: float | str) -> float:
    return float(value)  # "inf", "-inf", "nan" are JSON-safe spellings of the specials


def f32_bytes(values: list) -> bytes:
    return b"".join(struct.pack("<f", _special(v)) for v in values)


def f16_bytes(values: list) -> bytes:
    return b"".join(struct.pack("<e", _special(v)) for v in values)


def bf16_bytes(values: list) -> bytes:
    out = b""
    for v in values:
        value = _special(v)
        if math.isnan(value):
            out += bytes.fromhex("c07f")  # canonical quiet NaN, as torch produces
            continue
        bits = struct.pack("<f", value)
        if bits[:2] != b"\x00\x00":
            raise ValueError(f"{v!r} is not exactly representable in bf16")
        out += bits[2:]
    return out


RAW = {"f32": f32_bytes, "bf16": bf16_bytes, "f16": f16_bytes}


def zstd_frame(raw: bytes, *, level: int = ZSTD_LEVEL, content_size: bool = True, checksum: bool = False) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size, write_checksum=checksum).compress(raw)


def data_for(codec: str, values: list, level: int = ZSTD_LEVEL) -> bytes:
    if codec == "f16+zstd":
        return zstd_frame(f16_bytes(values), level=level)
    return RAW[codec](values)


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def tensor_map(codec: object, shape: object, data: object) -> dict:
    return {0: codec, 1: shape, 2: data}


# ---------------------------------------------------------------- valid tensors

VALID_TENSORS: list[tuple[str, dict]] = [
    ("f16 spec example [[1.0, -2.0]] (spec/tensors.md §3.1)", {"codec": "f16", "shape": [1, 2], "values": [1.0, -2.0]}),
    ("f16 scalar", {"codec": "f16", "shape": [], "values": [0.5]}),
    (
        "f16 extremes: max, -max, min subnormal, min normal, negative zero",
        {"codec": "f16", "shape": [5], "values": [F16_MAX, -F16_MAX, F16_MIN_SUBNORMAL, F16_MIN_NORMAL, -0.0]},
    ),
    ("f16 decode-step shape [1, 1, 4]", {"codec": "f16", "shape": [1, 1, 4], "values": [0.25, -1.5, 3.0, 1024.0]}),
    ("f16 empty tensor [0, 4]", {"codec": "f16", "shape": [0, 4], "values": []}),
    ("f16 special values inf, -inf, nan", {"codec": "f16", "shape": [3], "values": ["inf", "-inf", "nan"]}),
    (
        "f16 with MAX_TENSOR_DIMS dimensions",
        {"codec": "f16", "shape": [1, 1, 1, 1, 1, 1, 1, 2], "values": [-0.125, 2048.0]},
    ),
    ("f32 scalar", {"codec": "f32", "shape": [], "values": [1.5]}),
    (
        "f32 [2, 3]: 1/3, max, min subnormal, negative zero, -1, 1e-3 as f32",
        {
            "codec": "f32",
            "shape": [2, 3],
            "values": [THIRD_F32, F32_MAX, F32_MIN_SUBNORMAL, -0.0, -1.0, struct.unpack("<f", struct.pack("<f", 1e-3))[0]],
        },
    ),
    ("f32 special values inf, -inf, nan", {"codec": "f32", "shape": [3], "values": ["inf", "-inf", "nan"]}),
    ("f32 empty tensor [2, 0, 3]", {"codec": "f32", "shape": [2, 0, 3], "values": []}),
    (
        "bf16 [5]: 1, -2.5, pi as bf16, min subnormal, negative zero",
        {"codec": "bf16", "shape": [5], "values": [1.0, -2.5, PI_BF16, BF16_MIN_SUBNORMAL, -0.0]},
    ),
    (
        "bf16 [2, 2, 2] beyond fp16 range",
        {"codec": "bf16", "shape": [2, 2, 2], "values": [2.0**100, -(2.0**-100), 65536.0, 1.0, 0.0, -3.0, 0.5, 7.0]},
    ),
    ("f16+zstd [1, 2]", {"codec": "f16+zstd", "shape": [1, 2], "values": [1.0, -2.0], "zstd_level": ZSTD_LEVEL}),
    (
        "f16+zstd [4, 16] repetitive (compresses)",
        {"codec": "f16+zstd", "shape": [4, 16], "values": [float(i % 4) - 1.5 for i in range(64)], "zstd_level": ZSTD_LEVEL},
    ),
    ("f16+zstd empty tensor [0]", {"codec": "f16+zstd", "shape": [0], "values": [], "zstd_level": ZSTD_LEVEL}),
    (
        "f16+zstd level 3 with negative zero and subnormal",
        {"codec": "f16+zstd", "shape": [2, 2], "values": [-0.0, F16_MIN_SUBNORMAL, 1.0, 1.0], "zstd_level": 3},
    ),
]


def valid_tensor_vectors() -> list[dict]:
    out = []
    for name, fields in VALID_TENSORS:
        data = data_for(fields["codec"], fields["values"], fields.get("zstd_level", ZSTD_LEVEL))
        out.append({"name": name, "fields": fields, "hex": pack(tensor_map(fields["codec"], fields["shape"], data)).hex()})
    return out


# ---------------------------------------------------------------- invalid tensors

F16_12 = f16_bytes([1.0, -2.0])  # data of the [1, 2] example
GOOD = tensor_map("f16", [1, 2], F16_12)


def _zstd_with_dict_id(raw: bytes) -> bytes:
    frame = zstd_frame(raw)
    # Frame_Header_Descriptor at offset 4; set Dictionary_ID_flag = 1 and insert a
    # 1-byte Dictionary_ID after it (single-segment frames have no Window_Descriptor).
    fhd = frame[4]
    assert fhd & 0x20 and not fhd & 0x03, "expected a single-segment frame without a dictionary"
    return frame[:4] + bytes([fhd | 0x01, 0x07]) + frame[5:]


def _zstd_reserved_block(raw: bytes) -> bytes:
    frame = zstd_frame(raw)
    header = 4 + 1 + 1  # magic, descriptor, 1-byte Frame_Content_Size (single segment, size < 256)
    block = int.from_bytes(frame[header : header + 3], "little")
    block = (block & ~0b110) | (3 << 1)  # Block_Type = 3 (reserved)
    return frame[:header] + block.to_bytes(3, "little") + frame[header + 3 :]


def _zstd_bad_checksum(raw: bytes) -> bytes:
    frame = zstd_frame(raw, checksum=True)
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


REPETITIVE = f16_bytes([1.0] * 64)


def invalid_tensor_vectors() -> list[dict]:
    v: list[tuple[str, bytes, str, str]] = []

    def add(name: str, data: bytes, error: str, rule: str) -> None:
        v.append((name, data, error, rule))

    # --- msgpack level (§3.2)
    good = pack(GOOD)
    add("empty input", b"", "MALFORMED", "§3.2 not exactly one msgpack object")
    add("truncated map header only", b"\x83", "MALFORMED", "§3.2 not exactly one msgpack object (truncated)")
    add("truncated inside data", good[:-1], "MALFORMED", "§3.2 not exactly one msgpack object (truncated)")
    add("trailing byte after the map", good + b"\x00", "MALFORMED", "§3.2 trailing bytes")
    add("two maps back to back", good + good, "MALFORMED", "§3.2 trailing bytes")
    add("reserved msgpack byte 0xc1", b"\xc1", "MALFORMED", "§3.2 not valid msgpack")
    add(
        "codec str is not UTF-8",
        b"\x83\x00\xa3\xff\xfe\xfd" + good[6:],
        "MALFORMED",
        "§3.2 not valid msgpack (str must be UTF-8)",
    )
    add(
        "bin header declares 2^32 - 1 bytes, none follow",
        good[: good.index(b"\x02\xc4") + 1] + b"\xc6\xff\xff\xff\xff",
        "MALFORMED",
        "§3.2 not exactly one msgpack object (truncated; nothing is allocated for the declared length)",
    )
    add(
        f"shape array of {MAX_MSGPACK_CONTAINER + 1} entries",
        pack(tensor_map("f16", [1] * (MAX_MSGPACK_CONTAINER + 1), F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 more than MAX_TENSOR_DIMS dimensions (also above MAX_MSGPACK_CONTAINER)",
    )

    # --- structure (§3.3 steps 1-2)
    add("not a map: array", pack(["f16", [1, 2], F16_12]), "INVALID_FIELD", "§3.3 step 1 tensor is not a map")
    add("not a map: nil", pack(None), "INVALID_FIELD", "§3.3 step 1 tensor is not a map")
    add("not a map: integer", pack(7), "INVALID_FIELD", "§3.3 step 1 tensor is not a map")
    add("not a map: bin", pack(F16_12), "INVALID_FIELD", "§3.3 step 1 tensor is not a map")
    add("empty map", pack({}), "INVALID_FIELD", "§3.3 step 2 keys not exactly 0, 1, 2")
    add("missing key 0 (codec)", pack({1: [1, 2], 2: F16_12}), "INVALID_FIELD", "§3.3 step 2 missing codec")
    add("missing key 1 (shape)", pack({0: "f16", 2: F16_12}), "INVALID_FIELD", "§3.3 step 2 missing shape")
    add("missing key 2 (data)", pack({0: "f16", 1: [1, 2]}), "INVALID_FIELD", "§3.3 step 2 missing data")
    add("extra key 3", pack({**GOOD, 3: 0}), "INVALID_FIELD", "§3.3 step 2 unknown key")
    add(
        "string keys",
        pack({"codec": "f16", "shape": [1, 2], "data": F16_12}),
        "INVALID_FIELD",
        "§3.3 step 2 keys must be integers",
    )
    add(
        "key 1 written as true",
        b"\x83\x00\xa3f16\xc3\x92\x01\x02\x02\xc4\x04" + F16_12,
        "INVALID_FIELD",
        "§3.2 booleans are not integer keys",
    )
    add(
        "key 1 written as float 1.0",
        b"\x83\x00\xa3f16\xcb" + struct.pack(">d", 1.0) + b"\x92\x01\x02\x02\xc4\x04" + F16_12,
        "INVALID_FIELD",
        "§3.2 floats are not integer keys",
    )
    add("negative key -1 instead of 2", pack({0: "f16", 1: [1, 2], -1: F16_12}), "INVALID_FIELD", "§3.3 step 2 unknown key")

    # --- codec (§3.3 step 3)
    add("codec as bin", pack(tensor_map(b"f16", [1, 2], F16_12)), "INVALID_FIELD", "§3.3 step 3 codec not a str")
    add("codec as integer", pack(tensor_map(16, [1, 2], F16_12)), "INVALID_FIELD", "§3.3 step 3 codec not a str")
    add("codec nil", pack(tensor_map(None, [1, 2], F16_12)), "INVALID_FIELD", "§3.3 step 3 codec not a str")
    add("unknown codec f64", pack(tensor_map("f64", [1, 2], F16_12 * 4)), "INVALID_TENSOR", "§3.3 step 3 unknown codec")
    add("codec names are case-sensitive: F16", pack(tensor_map("F16", [1, 2], F16_12)), "INVALID_TENSOR", "§3.3 step 3 unknown codec")
    add("empty codec name", pack(tensor_map("", [1, 2], F16_12)), "INVALID_TENSOR", "§3.3 step 3 unknown codec")
    add("unknown codec f16+lz4", pack(tensor_map("f16+lz4", [1, 2], F16_12)), "INVALID_TENSOR", "§3.3 step 3 unknown codec")

    # --- shape (§3.3 step 4)
    add("shape as integer", pack(tensor_map("f16", 2, F16_12)), "INVALID_FIELD", "§3.3 step 4 shape not an array")
    add("shape as map", pack(tensor_map("f16", {0: 2}, F16_12)), "INVALID_FIELD", "§3.3 step 4 shape not an array")
    add("shape as bin", pack(tensor_map("f16", b"\x01\x02", F16_12)), "INVALID_FIELD", "§3.3 step 4 shape not an array")
    add("negative dimension", pack(tensor_map("f16", [-1, 2], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add("dimension as float", pack(tensor_map("f16", [1.0, 2], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add("dimension as true", pack(tensor_map("f16", [True, 2], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add("dimension nil", pack(tensor_map("f16", [None, 2], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add("dimension as str", pack(tensor_map("f16", ["2"], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add("nested shape", pack(tensor_map("f16", [[1, 2]], F16_12)), "INVALID_FIELD", "§3.3 step 4 entry not a uint")
    add(
        f"{MAX_TENSOR_DIMS + 1} dimensions",
        pack(tensor_map("f16", [1] * MAX_TENSOR_DIMS + [2], F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 more than MAX_TENSOR_DIMS dimensions",
    )
    add(
        "dimension MAX_TENSOR_ELEMENTS + 1",
        pack(tensor_map("f16", [MAX_TENSOR_ELEMENTS + 1], F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 dimension above the element limit",
    )
    add(
        "dimension 2^64 - 1",
        pack(tensor_map("f16", [2**64 - 1, 1], F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 dimension above the element limit",
    )
    add(
        "huge dimension after a zero dimension",
        pack(tensor_map("f16", [0, 2**32], b"")),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 dimension above the element limit (even when the product is 0)",
    )
    add(
        "empty tensor whose non-zero dimensions multiply past the limit",
        pack(tensor_map("f16", [4096, 4097, 0], b"")),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 product of the non-zero entries above the limit",
    )
    add(
        "fuzz crash: shape [2^24, 2^24, 2^24, 3, 0] (strides overflow int64)",
        pack(tensor_map("f16", [1 << 24, 1 << 24, 1 << 24, 3, 0], b"")),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 product of the non-zero entries above the limit",
    )
    add(
        "element count 4096 x 4097 over MAX_TENSOR_ELEMENTS",
        pack(tensor_map("f16", [4096, 4097], F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 element count above the limit",
    )
    add(
        "element count 2^8 x 2^8 x 2^8 x 2 over MAX_TENSOR_ELEMENTS",
        pack(tensor_map("f32", [256, 256, 256, 2], F16_12)),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 element count above the limit",
    )
    add(
        "zstd bomb: tiny frame, shape over the limit",
        pack(tensor_map("f16+zstd", [4096, 4097], zstd_frame(b"\x00" * 1024))),
        "LIMIT_EXCEEDED",
        "§3.3 step 4 element count checked before decompressing",
    )

    # --- data (§3.3 step 5)
    add("data as str", pack(tensor_map("f16", [1, 2], "\x00<\x00\xc0")), "INVALID_FIELD", "§3.3 step 5 data not a bin")
    add("data as array", pack(tensor_map("f16", [1, 2], [1.0, -2.0])), "INVALID_FIELD", "§3.3 step 5 data not a bin")
    add("data nil", pack(tensor_map("f16", [1, 2], None)), "INVALID_FIELD", "§3.3 step 5 data not a bin")

    # --- raw sizes (§3.3 step 6, §4)
    add("f16 data one element short", pack(tensor_map("f16", [1, 2], F16_12[:2])), "INVALID_TENSOR", "§4 raw size != n x 2")
    add("f16 data one element long", pack(tensor_map("f16", [1, 2], F16_12 + F16_12[:2])), "INVALID_TENSOR", "§4 raw size != n x 2")
    add("f16 data odd length", pack(tensor_map("f16", [1, 2], F16_12[:3])), "INVALID_TENSOR", "§4 raw size != n x 2")
    add("f16 empty data for a scalar", pack(tensor_map("f16", [], b"")), "INVALID_TENSOR", "§4 raw size != n x 2 (scalar has n = 1)")
    add("f16 data for an empty tensor", pack(tensor_map("f16", [0, 4], F16_12)), "INVALID_TENSOR", "§4 raw size != n x 2 (n = 0)")
    add("f32 with f16-sized data", pack(tensor_map("f32", [1, 2], F16_12)), "INVALID_TENSOR", "§4.1 raw size != n x 4")
    add("bf16 data short", pack(tensor_map("bf16", [3], bf16_bytes([1.0, 2.0]))), "INVALID_TENSOR", "§4.2 raw size != n x 2")

    # --- zstd (§4.4)
    add("f16+zstd empty data", pack(tensor_map("f16+zstd", [1, 2], b"")), "INVALID_TENSOR", "§4.4 step 1 no frame header")
    add(
        "f16+zstd data is raw fp16 (not compressed)",
        pack(tensor_map("f16+zstd", [1, 2], F16_12)),
        "INVALID_TENSOR",
        "§4.4 step 1 bad magic number",
    )
    add(
        "f16+zstd truncated frame header",
        pack(tensor_map("f16+zstd", [1, 2], zstd_frame(F16_12)[:5])),
        "INVALID_TENSOR",
        "§4.4 step 1 header cannot be parsed",
    )
    add(
        "f16+zstd skippable frame",
        pack(tensor_map("f16+zstd", [1, 2], bytes.fromhex("502a4d18") + (4).to_bytes(4, "little") + F16_12)),
        "INVALID_TENSOR",
        "§4.4 step 1-2 not a zstd data frame with content size",
    )
    add(
        "f16+zstd frame without content size",
        pack(tensor_map("f16+zstd", [1, 32], zstd_frame(REPETITIVE, content_size=False))),
        "INVALID_TENSOR",
        "§4.4 step 2 no declared content size",
    )
    add(
        "f16+zstd content size larger than the shape needs",
        pack(tensor_map("f16+zstd", [1, 2], zstd_frame(F16_12 + F16_12))),
        "INVALID_TENSOR",
        "§4.4 step 3 content size != n x 2",
    )
    add(
        "f16+zstd content size smaller than the shape needs",
        pack(tensor_map("f16+zstd", [1, 4], zstd_frame(F16_12))),
        "INVALID_TENSOR",
        "§4.4 step 3 content size != n x 2",
    )
    add(
        "f16+zstd frame of an empty tensor with a non-empty shape",
        pack(tensor_map("f16+zstd", [1], zstd_frame(b""))),
        "INVALID_TENSOR",
        "§4.4 step 3 content size != n x 2",
    )
    add(
        "f16+zstd frame names a dictionary",
        pack(tensor_map("f16+zstd", [1, 2], _zstd_with_dict_id(F16_12))),
        "INVALID_TENSOR",
        "§4.4 step 4 dictionary",
    )
    add(
        "f16+zstd reserved block type",
        pack(tensor_map("f16+zstd", [1, 64], _zstd_reserved_block(REPETITIVE + REPETITIVE))),
        "INVALID_TENSOR",
        "§4.4 step 5 corrupt data",
    )
    add(
        "f16+zstd truncated frame body",
        pack(tensor_map("f16+zstd", [1, 32], zstd_frame(REPETITIVE)[:-2])),
        "INVALID_TENSOR",
        "§4.4 step 5 corrupt data",
    )
    add(
        "f16+zstd bad content checksum",
        pack(tensor_map("f16+zstd", [1, 32], _zstd_bad_checksum(REPETITIVE))),
        "INVALID_TENSOR",
        "§4.4 step 5 checksum mismatch",
    )
    add(
        "f16+zstd byte after the frame",
        pack(tensor_map("f16+zstd", [1, 2], zstd_frame(F16_12) + b"\x00")),
        "INVALID_TENSOR",
        "§4.4 step 5 bytes after the frame",
    )
    add(
        "f16+zstd two frames",
        pack(tensor_map("f16+zstd", [1, 2], zstd_frame(F16_12) + zstd_frame(F16_12))),
        "INVALID_TENSOR",
        "§4.4 step 5 bytes after the frame",
    )
    return [{"name": n, "hex": d.hex(), "error": e, "rule": r} for n, d, e, r in v]


# ---------------------------------------------------------------- frames (§6)


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def frame_vectors() -> tuple[list[dict], list[dict]]:
    p1 = bytes.fromhex("810001")
    p2 = pack({0: 1, 1: "hello"})
    long = bytes(range(256)) + bytes(44)
    valid = [
        ("one frame (spec/tensors.md §6.1 example)", [p1]),
        ("one-byte payload", [b"\xc0"]),
        ("two frames back to back", [p1, p2]),
        ("300-byte payload", [long]),
        ("no frames (empty stream)", []),
    ]
    valid_out = [
        {"name": n, "fields": {"payloads": [p.hex() for p in ps]}, "hex": b"".join(frame(p) for p in ps).hex()}
        for n, ps in valid
    ]
    invalid = [
        ("zero-length frame", b"\x00\x00\x00\x00", "MALFORMED", "§6.2 length must be at least 1"),
        ("zero-length frame after a valid one", frame(p1) + b"\x00\x00\x00\x00", "MALFORMED", "§6.2 length must be at least 1"),
        (
            "length MAX_FRAME_BYTES + 1",
            (MAX_FRAME_BYTES + 1).to_bytes(4, "big"),
            "LIMIT_EXCEEDED",
            "§6.2 length above MAX_FRAME_BYTES, rejected before the payload",
        ),
        ("length 2^32 - 1", b"\xff\xff\xff\xff" + b"\x00" * 8, "LIMIT_EXCEEDED", "§6.2 length above MAX_FRAME_BYTES"),
        (
            "oversize length after a valid frame",
            frame(p1) + b"\x80\x00\x00\x00",
            "LIMIT_EXCEEDED",
            "§6.3 length checked as soon as the prefix arrives",
        ),
        ("stream ends inside the length prefix", b"\x00\x00\x00", "MALFORMED", "§6.3 truncated frame"),
        ("stream ends inside the payload", b"\x00\x00\x00\x05\x01\x02", "MALFORMED", "§6.3 truncated frame"),
        ("stream ends after a frame and a partial one", frame(p1) + b"\x00\x00", "MALFORMED", "§6.3 truncated frame"),
    ]
    invalid_out = [{"name": n, "hex": d.hex(), "error": e, "rule": r} for n, d, e, r in invalid]
    return valid_out, invalid_out


def main() -> None:
    zstd_version = ".".join(map(str, zstandard.ZSTD_VERSION))
    tensors = {
        "spec": "spec/tensors.md",
        "revision": 1,
        "description": (
            "Standalone tensors (spec/tensors.md §3.2). fields: codec, shape, values in row-major order "
            "(exactly representable in the codec; the strings 'inf', '-inf', 'nan' stand for those values; "
            "-0.0 is negative zero); f16+zstd vectors add zstd_level. f16+zstd bytes come from the libzstd "
            "version in 'zstd_version' and need not be reproduced byte for byte (§9). Invalid vectors break "
            "exactly one rule; 'error' is the ErrorCode name."
        ),
        "zstd_version": zstd_version,
        "valid": valid_tensor_vectors(),
        "invalid": invalid_tensor_vectors(),
    }
    valid_frames, invalid_frames = frame_vectors()
    frames = {
        "spec": "spec/tensors.md",
        "revision": 1,
        "description": (
            "Byte streams of frames (spec/tensors.md §6). fields.payloads: the payloads (hex) a receiver "
            "returns, in order, when the stream then ends. Invalid streams: the error a receiver reports "
            "when fed the bytes (at once or one byte at a time) followed by the end of the stream."
        ),
        "valid": valid_frames,
        "invalid": invalid_frames,
    }
    for name, doc in (("tensors.json", tensors), ("frames.json", frames)):
        (HERE / name).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {HERE / name}: {len(doc['valid'])} valid, {len(doc['invalid'])} invalid")


if __name__ == "__main__":
    main()
