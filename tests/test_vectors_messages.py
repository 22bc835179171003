"""spec/vectors/messages.json checked both ways (spec/messages.md §9).

valid: encode(fields) == hex exactly, decode(hex) == fields. accepted: decode(hex) ==
fields (non-canonical encodings a receiver MUST accept). invalid: decode(hex) raises
exactly the error code, also through the frame decoder as a node receives it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.framing import FrameDecoder, encode_frame
from biopetals.protocol.messages import MESSAGE_TYPES, decode_message, encode_message

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "spec/vectors/generate_messages.py"
VECTORS = json.loads((ROOT / "spec/vectors/messages.json").read_text())
SAME_ZSTD = VECTORS["zstd_version"] == ".".join(map(str, zstandard.ZSTD_VERSION))
_spec = importlib.util.spec_from_file_location("generate_messages", GENERATOR)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]


def test_file_header() -> None:
    assert VECTORS["spec"] == "spec/messages.md" and VECTORS["revision"] == 1
    assert len(VECTORS["valid"]) >= 15 and len(VECTORS["accepted"]) >= 5 and len(VECTORS["invalid"]) >= 100
    names = [v["name"] for v in VECTORS["valid"] + VECTORS["accepted"] + VECTORS["invalid"]]
    assert len(names) == len(set(names)), "vector names must be unique"


def test_generator_output_is_committed() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT)
    assert result.returncode == 0, "spec/vectors/messages.json is stale: rerun spec/vectors/generate_messages.py"


def test_every_message_type_has_a_valid_vector() -> None:
    covered = {v["fields"]["type"] for v in VECTORS["valid"]}
    assert covered == {cls.__name__ for cls in MESSAGE_TYPES.values()}


def test_every_codec_appears_in_a_valid_vector() -> None:
    codecs = {gen.fields_codec(v["fields"]) for v in VECTORS["valid"]} - {None}
    assert codecs == {"f32", "bf16", "f16", "f16+zstd"}


def test_every_decoding_error_code_has_an_invalid_vector() -> None:
    """Each code the message decoder can raise (spec/messages.md §2.5, §7.2) is exercised."""
    expected = {
        ErrorCode.MALFORMED,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_MESSAGE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.INVALID_TENSOR,
        ErrorCode.NON_FINITE,
        ErrorCode.BAD_POSITION,
        ErrorCode.DTYPE_MISMATCH,
    }
    assert {ErrorCode[v["error"]] for v in VECTORS["invalid"]} == expected


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    codec = gen.fields_codec(vector["fields"])
    message = gen.fields_to_message(vector["fields"])
    if codec != "f16+zstd" or SAME_ZSTD:  # zstd output may differ between libzstd versions
        assert encode_message(message, codec) == data
    decoded = decode_message(data)
    assert decoded == message
    assert gen.message_to_fields(decoded, codec) == vector["fields"]
    # Also as any receiver gets it: a memoryview slice of a larger buffer.
    assert decode_message(memoryview(b"\x00" + data)[1:]) == message


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=lambda v: v["name"])
def test_accepted(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    decoded = decode_message(data)
    message = gen.fields_to_message(vector["fields"])
    assert decoded == message
    codec = gen.fields_codec(vector["fields"])
    assert gen.message_to_fields(decoded, codec) == vector["fields"]
    assert encode_message(decoded, codec) != data, "an accepted vector should be non-canonical"


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data)
    assert info.value.code == ErrorCode[vector["error"]], info.value.message
    assert vector["rule"].startswith("§") or vector["rule"].startswith("spec/")


@pytest.mark.parametrize("vector", [v for v in VECTORS["invalid"] if v["hex"]], ids=lambda v: v["name"])
def test_invalid_through_frames(vector: dict) -> None:
    """A node reads frames then decodes: the same code, and the next frame still decodes (§2.6)."""
    data = bytes.fromhex(vector["hex"])
    good = bytes.fromhex(VECTORS["valid"][0]["hex"])
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(data) + encode_frame(good))
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(decoder.next_frame())
    assert info.value.code == ErrorCode[vector["error"]]
    assert decode_message(decoder.next_frame()) == gen.fields_to_message(VECTORS["valid"][0]["fields"])


@pytest.mark.parametrize("vector", VECTORS["unexpected"], ids=lambda v: v["name"])
def test_unexpected(vector: dict) -> None:
    """A type not expected where it arrives is UNKNOWN_MESSAGE whatever its body (§2.1, §2.5 step 5)."""
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(bytes.fromhex(vector["hex"]), gen.PLACES[vector["where"]])
    assert info.value.code == ErrorCode[vector["error"]] == ErrorCode.UNKNOWN_MESSAGE, info.value.message


def test_unexpected_covers_both_places() -> None:
    places = {v["where"] for v in VECTORS["unexpected"]}
    assert places == {"first", "session"} and len(VECTORS["unexpected"]) >= 50
