"""spec/vectors/weights.json checked both ways (spec/weights.md).

Each vector's ``kind`` names its decoder: ``manifest`` (parse_manifest / encode_manifest),
``message`` (decode_weights_message / encode_weights_message) or ``provider``
(decode_provider / encode_provider). valid: encode(fields) == hex exactly and
decode(hex) == fields. accepted: decode(hex) == fields. invalid: decode(hex) raises
RemoteProtocolError with exactly the error code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.manifest import MAX_MANIFEST_BYTES, encode_manifest, parse_manifest
from biopetals.protocol.weights import (
    REQUESTS,
    ChunkData,
    GetChunk,
    ProviderRecord,
    decode_provider,
    decode_weights_message,
    encode_provider,
    encode_weights_message,
    part_ranges,
)

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "spec/vectors/generate_weights.py"
VECTORS = json.loads((ROOT / "spec/vectors/weights.json").read_text())
_spec = importlib.util.spec_from_file_location("generate_weights", GENERATOR)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]

DECODERS = {"manifest": parse_manifest, "message": decode_weights_message, "provider": decode_provider}


def _of(kind: str, group: str) -> list[dict]:
    return [v for v in VECTORS[group] if v["kind"] == kind]


def test_file_header() -> None:
    assert VECTORS["spec"] == "spec/weights.md" and VECTORS["revision"] == 1
    names = [v["name"] for v in VECTORS["valid"] + VECTORS["accepted"] + VECTORS["invalid"]]
    assert len(names) == len(set(names)), "vector names must be unique"
    assert {v["kind"] for v in VECTORS["valid"] + VECTORS["accepted"] + VECTORS["invalid"]} == set(DECODERS)


def test_generator_output_is_committed() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT)
    assert result.returncode == 0, "spec/vectors/weights.json is stale: rerun spec/vectors/generate_weights.py"


# ----------------------------------------------------------------------------- manifests


def _manifest_summary(raw: bytes) -> dict:
    manifest = parse_manifest(raw)
    return {
        "sha256": manifest.hash.hex(),
        "swarm_name": manifest.swarm_name,
        "parts": [{"name": p.name, "size": p.size, "chunks": len(p.chunks),
                   "offsets": [e.offset for e in (p.files or p.tensors)]} for p in manifest.parts],
    }


def _check_manifest(vector: dict) -> None:
    raw = bytes.fromhex(vector["hex"])
    fields = vector["fields"]
    assert hashlib.sha256(raw).hexdigest() == fields["sha256"]
    assert fields["swarm_name"] == f"{fields['document']['name']}.{fields['sha256'][:16]}"
    assert _manifest_summary(raw) == {k: fields[k] for k in ("sha256", "swarm_name", "parts")}
    manifest = parse_manifest(raw)
    assert manifest.name == fields["document"]["name"] and manifest.config == fields["document"]["config"]
    # The chunk hashes are those of the parts' bytes (spec/weights.md §2.2): check them from "data".
    for part in manifest.parts:
        data = fields["data"][part.name]
        data = gen.pattern(part.size) if data == "pattern" else bytes.fromhex(data)
        assert len(data) == part.size
        for index, digest in enumerate(part.chunks):
            start, end = manifest.chunk_range(part.index, index)
            assert end - start == min(manifest.chunk_size, part.size - index * manifest.chunk_size)
            assert hashlib.sha256(data[start:end]).digest() == digest, (part.name, index)


@pytest.mark.parametrize("vector", _of("manifest", "valid"), ids=lambda v: v["name"])
def test_valid_manifest(vector: dict) -> None:
    assert encode_manifest(vector["fields"]["document"]) == bytes.fromhex(vector["hex"])
    _check_manifest(vector)


@pytest.mark.parametrize("vector", _of("manifest", "accepted"), ids=lambda v: v["name"])
def test_accepted_manifest(vector: dict) -> None:
    _check_manifest(vector)
    # Other bytes for the same weights are another manifest: their own hash and swarm name.
    small = next(v for v in _of("manifest", "valid") if v["name"] == "manifest: two blocks, two files")
    assert vector["hex"] != small["hex"] and vector["fields"]["swarm_name"] != small["fields"]["swarm_name"]
    assert parse_manifest(bytes.fromhex(vector["hex"])).parts == parse_manifest(bytes.fromhex(small["hex"])).parts


def test_manifest_over_the_limit_is_refused_before_parsing() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1))
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED and MAX_MANIFEST_BYTES == 32 << 20


def test_manifest_encoder_refuses_what_the_parser_refuses() -> None:
    document = gen.small_document()
    document["chunk_size"] = 3 << 20
    with pytest.raises(LocalProtocolError) as info:
        encode_manifest(document)
    assert info.value.code == ErrorCode.INVALID_FIELD
    with pytest.raises(LocalProtocolError):
        encode_manifest({**gen.small_document(), "config": {"x": float("nan")}})


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize("vector", _of("message", "valid"), ids=lambda v: v["name"])
def test_valid_message(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    assert encode_weights_message(gen.fields_to_message(vector["fields"])) == data
    assert gen.message_to_fields(decode_weights_message(data)) == vector["fields"]


@pytest.mark.parametrize("vector", _of("message", "accepted"), ids=lambda v: v["name"])
def test_accepted_message(vector: dict) -> None:
    assert gen.message_to_fields(decode_weights_message(bytes.fromhex(vector["hex"]))) == vector["fields"]


def test_every_message_type_has_a_valid_vector() -> None:
    assert {v["fields"]["type"] for v in _of("message", "valid")} == set(gen.MESSAGES)


def test_a_server_reads_requests_only() -> None:
    reply = encode_weights_message(ChunkData(part=0, index=0, data=b"x"))
    with pytest.raises(RemoteProtocolError) as info:
        decode_weights_message(reply, REQUESTS)
    assert info.value.code == ErrorCode.UNKNOWN_MESSAGE
    request = encode_weights_message(GetChunk(manifest_hash=bytes(32), part=1, index=2))
    assert isinstance(decode_weights_message(request, REQUESTS), GetChunk)


def test_chunk_data_over_the_largest_chunk_is_a_limit() -> None:
    body = {0: 0, 1: 0, 2: bytes((16 << 20) + 1)}
    with pytest.raises(RemoteProtocolError) as info:
        decode_weights_message(gen.pack(gen.envelope(4, body)))
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


# ----------------------------------------------------------------------------- provider records


@pytest.mark.parametrize("vector", _of("provider", "valid"), ids=lambda v: v["name"])
def test_valid_provider(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    assert encode_provider(gen.fields_to_provider(vector["fields"])) == data
    assert gen.provider_to_fields(decode_provider(data)) == vector["fields"]


@pytest.mark.parametrize("vector", _of("provider", "accepted"), ids=lambda v: v["name"])
def test_accepted_provider(vector: dict) -> None:
    assert gen.provider_to_fields(decode_provider(bytes.fromhex(vector["hex"]))) == vector["fields"]


def test_part_ranges_is_the_canonical_form() -> None:
    assert part_ranges([5, 0, 1, 2, 3, 1024, 1025, 2]) == (0, 4, 5, 6, 1024, 1026)
    record = ProviderRecord(manifest_hash=bytes(32), ranges=part_ranges([0, 1, 3]))
    assert record.parts() == [0, 1, 3] and record.holds(3) and not record.holds(2)
    with pytest.raises(LocalProtocolError):
        ProviderRecord(manifest_hash=bytes(32), ranges=(0, 2, 2, 4))  # touching: not canonical


# ----------------------------------------------------------------------------- invalid, all kinds


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid(vector: dict) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        DECODERS[vector["kind"]](bytes.fromhex(vector["hex"]))
    assert info.value.code == ErrorCode[vector["error"]], info.value
    assert vector["rule"].startswith("§")


def test_every_decoding_error_code_is_covered() -> None:
    def codes(kind: str) -> set[str]:
        return {v["error"] for v in _of(kind, "invalid")}

    assert codes("manifest") == {"MALFORMED", "UNSUPPORTED_VERSION", "INVALID_FIELD"}  # LIMIT_EXCEEDED: test above
    assert codes("message") == {"MALFORMED", "UNSUPPORTED_VERSION", "UNKNOWN_MESSAGE", "INVALID_FIELD", "LIMIT_EXCEEDED"}
    assert codes("provider") == {"MALFORMED", "UNSUPPORTED_VERSION", "INVALID_FIELD", "LIMIT_EXCEEDED"}
