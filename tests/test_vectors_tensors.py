"""Check the reference tensor and frame codecs against spec/vectors/{tensors,frames}.json.

Every valid vector both ways (fields -> exact bytes, bytes -> fields); every invalid
vector must raise exactly its error code, through ``unpack_tensor`` and, where the
bytes are well-formed msgpack, through ``decode_tensor`` as a message codec calls it.
Frames are fed whole and one byte at a time. See spec/tensors.md §9.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.framing import FrameDecoder
from biopetals.protocol.tensors import Codec, decode_tensor, pack_tensor, unpack_tensor

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
TENSORS = json.loads((VECTORS / "tensors.json").read_text())
FRAMES = json.loads((VECTORS / "frames.json").read_text())
SAME_ZSTD = TENSORS["zstd_version"] == ".".join(map(str, zstandard.ZSTD_VERSION))

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f16+zstd": torch.float16}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def tensor_from_fields(fields: dict) -> torch.Tensor:
    values = [float(v) for v in fields["values"]]  # float("nan"), float("inf") read the string spellings
    # float64 holds every value exactly, and converting an exactly representable value is exact.
    return torch.tensor(values, dtype=torch.float64).to(DTYPES[fields["codec"]]).reshape(fields["shape"])


def bits(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(BITS[t.dtype]).flatten().tolist()


def ids(vectors: list[dict]) -> list[str]:
    return [v["name"] for v in vectors]


def test_vector_files_name_their_spec():
    for doc in (TENSORS, FRAMES):
        assert doc["spec"] == "spec/tensors.md"
        assert doc["revision"] == 1
        assert doc["valid"] and doc["invalid"]


@pytest.mark.parametrize("vector", TENSORS["valid"], ids=ids(TENSORS["valid"]))
def test_valid_tensor_encodes_to_exact_bytes(vector):
    fields = vector["fields"]
    expected = bytes.fromhex(vector["hex"])
    encoded = pack_tensor(tensor_from_fields(fields), fields["codec"], zstd_level=fields.get("zstd_level", 1))
    if fields["codec"] == Codec.F16_ZSTD and not SAME_ZSTD:
        # Compressed bytes are not canonical across libzstd versions (spec/tensors.md §9).
        assert bits(unpack_tensor(encoded)) == bits(unpack_tensor(expected))
    else:
        assert encoded == expected


@pytest.mark.parametrize("vector", TENSORS["valid"], ids=ids(TENSORS["valid"]))
def test_valid_tensor_decodes_to_fields(vector):
    fields = vector["fields"]
    decoded = unpack_tensor(bytes.fromhex(vector["hex"]))
    expected = tensor_from_fields(fields)
    assert decoded.dtype == DTYPES[fields["codec"]]
    assert list(decoded.shape) == fields["shape"]
    assert bits(decoded) == bits(expected)  # bit-exact: negative zero and NaN included


@pytest.mark.parametrize("vector", TENSORS["invalid"], ids=ids(TENSORS["invalid"]))
def test_invalid_tensor_raises_its_error(vector):
    data = bytes.fromhex(vector["hex"])
    with pytest.raises(RemoteProtocolError) as info:
        unpack_tensor(data)
    assert info.value.code == ErrorCode[vector["error"]], info.value


@pytest.mark.parametrize("vector", TENSORS["invalid"], ids=ids(TENSORS["invalid"]))
def test_invalid_tensor_embedded_in_a_message_raises_the_same_error(vector):
    """decode_tensor (what message codecs call) agrees with the standalone decoder."""
    try:
        obj = msgpack.unpackb(bytes.fromhex(vector["hex"]), raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        pytest.skip("not well-formed msgpack: only the standalone decoder sees these bytes")
    with pytest.raises(RemoteProtocolError) as info:
        decode_tensor(obj)
    assert info.value.code == ErrorCode[vector["error"]], info.value


def test_every_error_rule_has_a_vector():
    errors = {v["error"] for v in TENSORS["invalid"]}
    assert errors == {"MALFORMED", "INVALID_FIELD", "INVALID_TENSOR", "LIMIT_EXCEEDED"}
    codecs = {v["fields"]["codec"] for v in TENSORS["valid"]}
    assert codecs == {c.value for c in Codec}


def test_vector_files_match_the_generator():
    """The committed JSON is what spec/vectors/generate_tensors.py produces now."""
    spec = importlib.util.spec_from_file_location("generate_tensors", VECTORS / "generate_tensors.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    valid_frames, invalid_frames = gen.frame_vectors()
    assert FRAMES["valid"] == valid_frames
    assert FRAMES["invalid"] == invalid_frames
    assert TENSORS["invalid"] == gen.invalid_tensor_vectors() or not SAME_ZSTD
    assert TENSORS["valid"] == gen.valid_tensor_vectors() or not SAME_ZSTD


# ---------------------------------------------------------------- frames


def feed(chunks, decoder: FrameDecoder) -> list[bytes]:
    frames = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (payload := decoder.next_frame()) is not None:
            frames.append(payload)
    decoder.receive_data(b"")  # end of stream
    while (payload := decoder.next_frame()) is not None:
        frames.append(payload)
    return frames


def whole(data: bytes) -> list[bytes]:
    return [data] if data else []


def byte_by_byte(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("split", [whole, byte_by_byte], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("vector", FRAMES["valid"], ids=ids(FRAMES["valid"]))
def test_valid_frames_decode_to_payloads(vector, split):
    data = bytes.fromhex(vector["hex"])
    payloads = [bytes.fromhex(p) for p in vector["fields"]["payloads"]]
    assert feed(split(data), FrameDecoder()) == payloads


@pytest.mark.parametrize("vector", FRAMES["valid"], ids=ids(FRAMES["valid"]))
def test_valid_frames_encode_to_exact_bytes(vector):
    from biopetals.protocol.framing import encode_frame

    payloads = [bytes.fromhex(p) for p in vector["fields"]["payloads"]]
    assert b"".join(encode_frame(p) for p in payloads).hex() == vector["hex"]


@pytest.mark.parametrize("split", [whole, byte_by_byte], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize("vector", FRAMES["invalid"], ids=ids(FRAMES["invalid"]))
def test_invalid_frames_raise_their_error(vector, split):
    with pytest.raises(RemoteProtocolError) as info:
        feed(split(bytes.fromhex(vector["hex"])), FrameDecoder())
    assert info.value.code == ErrorCode[vector["error"]], info.value
