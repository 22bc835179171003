"""spec/vectors/announcement.json checked both ways (spec/announcement.md).

valid: encode(fields) == hex exactly, decode(hex) == fields. accepted: decode(hex) ==
fields. invalid: decode(hex) raises RemoteProtocolError with exactly the error code.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from biopetals.protocol.announcement import (
    MAX_ANNOUNCEMENT_BYTES,
    Announcement,
    State,
    decode_announcement,
    encode_announcement,
)
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "spec/vectors/generate_announcement.py"
VECTORS = json.loads((ROOT / "spec/vectors/announcement.json").read_text())
_spec = importlib.util.spec_from_file_location("generate_announcement", GENERATOR)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # type: ignore[union-attr]


def test_file_header() -> None:
    assert VECTORS["spec"] == "spec/announcement.md" and VECTORS["revision"] == 1
    names = [v["name"] for v in VECTORS["valid"] + VECTORS["accepted"] + VECTORS["invalid"]]
    assert len(names) == len(set(names))


def test_generator_output_is_committed() -> None:
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], cwd=ROOT)
    assert result.returncode == 0, "spec/vectors/announcement.json is stale: rerun spec/vectors/generate_announcement.py"


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    assert encode_announcement(gen.fields_to_announcement(vector["fields"])) == data
    assert gen.announcement_to_fields(decode_announcement(data)) == vector["fields"]


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=lambda v: v["name"])
def test_accepted(vector: dict) -> None:
    assert gen.announcement_to_fields(decode_announcement(bytes.fromhex(vector["hex"]))) == vector["fields"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid(vector: dict) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_announcement(bytes.fromhex(vector["hex"]))
    assert info.value.code == ErrorCode[vector["error"]], info.value
    assert vector["rule"].startswith("§")


def test_every_state_and_error_code_is_covered() -> None:
    assert {v["fields"]["state"] for v in VECTORS["valid"]} == {int(s) for s in State}
    assert {v["error"] for v in VECTORS["invalid"]} == {"MALFORMED", "UNSUPPORTED_VERSION", "INVALID_FIELD", "LIMIT_EXCEEDED"}


def test_encoder_refuses_what_the_spec_forbids() -> None:
    base = gen.fields_to_announcement(gen.BASE)
    with pytest.raises(LocalProtocolError):
        Announcement(**{**{k: getattr(base, k) for k in ("state", "inference_tps", "forward_tps", "cache_tokens_left", "dtype", "quant", "version")}, "start": 4, "end": 4})
    too_big = Announcement(
        state=State.ONLINE, start=0, end=1, inference_tps=1.0, forward_tps=1.0, cache_tokens_left=0,
        dtype="float32", quant="none", version="v", addrs=tuple(f"/dns4/{'h' * 200}{i}.example/tcp/1" for i in range(8)),
    )
    with pytest.raises(LocalProtocolError) as info:
        encode_announcement(too_big)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED and MAX_ANNOUNCEMENT_BYTES == 1024
