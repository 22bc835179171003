"""spec/vectors/dht.json checked both ways: encode(fields) == hex, decode(hex) == fields or the error."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from biopetals.dht import messages
from biopetals.dht.records import decode_record, encode_record, validate
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError

ROOT = Path(__file__).resolve().parents[1]
VECTORS = json.loads((ROOT / "spec/vectors/dht.json").read_text())
_spec = importlib.util.spec_from_file_location("generate_dht", ROOT / "spec/vectors/generate_dht.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]


def _decode(decoder: str, data: bytes, now_ms: int | None = None):
    if decoder == "record":
        return decode_record(data)
    if decoder == "record_validate":
        record = decode_record(data)
        validate(record, now_ms / 1000)
        return record
    if decoder == "request":
        return messages.decode_request(data)
    if decoder == "response":
        return messages.decode_response(data)
    raise AssertionError(decoder)


def test_file_header() -> None:
    assert VECTORS["spec"] == "spec/dht.md" and VECTORS["revision"] == 1
    assert len(VECTORS["valid"]) >= 10 and len(VECTORS["invalid"]) >= 40


def test_generator_output_is_committed() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "spec/vectors/generate_dht.py"), "--check"], cwd=ROOT)
    assert result.returncode == 0, "spec/vectors/dht.json is stale: rerun spec/vectors/generate_dht.py"


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    if vector["decoder"] == "record":
        record = gen.record_from_fields(vector["fields"])
        assert encode_record(record) == data
        decoded = decode_record(data)
        assert gen.record_to_fields(decoded) == vector["fields"]
        validate(decoded, vector["now_ms"] / 1000)  # valid records pass validation at now
    else:
        message = gen.fields_to_message(vector["fields"])
        assert messages.encode(message) == data
        decoded = _decode(vector["decoder"], data)
        assert decoded == message
        assert gen.message_to_fields(decoded) == vector["fields"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid(vector: dict) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        _decode(vector["decoder"], bytes.fromhex(vector["hex"]), vector.get("now_ms"))
    assert info.value.code == ErrorCode[vector["error"]], info.value
    assert vector["rule"].startswith("§")


def test_every_dht_error_code_has_a_vector() -> None:
    used = {v["error"] for v in VECTORS["invalid"]}
    for code in ("RECORD_INVALID", "BAD_SIGNATURE", "RECORD_TOO_LARGE", "RECORD_EXPIRED", "EXPIRATION_TOO_FAR",
                 "MALFORMED", "INVALID_FIELD", "LIMIT_EXCEEDED", "UNKNOWN_MESSAGE"):
        assert code in used, code


@pytest.mark.parametrize("vector", VECTORS["model_names"], ids=lambda v: v["name"])
def test_model_name_of_a_plain_checkpoint(vector: dict, tmp_path: Path) -> None:
    """spec/dht.md §6.1: a real checkpoint directory is named as the vector says."""
    from biopetals.models.config import model_info

    directory = tmp_path / vector["path"]
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(vector["config"]))
    info = model_info(directory)
    assert info.dht_prefix == vector["swarm_name"]
    assert info.fingerprint == hashlib.sha256(vector["fingerprint_json"].encode()).hexdigest()
