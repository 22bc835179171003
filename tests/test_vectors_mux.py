"""spec/vectors/mux.json checked both ways against protocol/mux.py (spec/transport.md §3.2-§3.9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.mux import Flag, Frame, FrameType, Mux, decode_frames, encode_frame

DOC = json.loads((Path(__file__).resolve().parents[1] / "spec" / "vectors" / "mux.json").read_text())


def _frame(fields: dict) -> Frame:
    flags = Flag.NONE
    for name in fields["flags"]:
        flags |= Flag[name]
    return Frame(FrameType[fields["type"]], flags, fields["stream_id"], bytes.fromhex(fields["payload"]))


def test_file_header() -> None:
    assert DOC["spec"] == "spec/transport.md" and DOC["revision"] == 1
    assert len(DOC["valid"]) >= 10 and len(DOC["invalid"]) >= 20


@pytest.mark.parametrize("vector", DOC["valid"], ids=lambda v: v["name"])
def test_valid_encode_and_decode(vector: dict) -> None:
    frame = _frame(vector["fields"])
    assert encode_frame(frame).hex() == vector["hex"]
    assert decode_frames(bytes.fromhex(vector["hex"])) == [frame]


@pytest.mark.parametrize("vector", DOC["invalid"], ids=lambda v: v["name"])
@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_invalid_fails_with_the_stated_code(vector: dict, byte_by_byte: bool) -> None:
    data = bytes.fromhex(vector["hex"])
    mux = Mux(initiator=vector["fields"]["receiver"] == "initiator")
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    with pytest.raises(RemoteProtocolError) as info:
        for chunk in chunks:
            mux.receive_data(chunk)
    assert ErrorCode(info.value.code).name == vector["error"], info.value


def test_valid_frames_form_a_stream_the_responder_accepts() -> None:
    """OPEN, DATA, FIN from the vectors, in order, are a well-formed stream for a responder."""
    by_name = {v["name"]: bytes.fromhex(v["hex"]) for v in DOC["valid"]}
    data = by_name["OPEN stream 1 for /biopetals/rpc/1"] + by_name["DATA with payload"] + by_name["DATA empty with FIN (half-close)"]
    events = Mux(initiator=False).receive_data(data)
    assert [type(e).__name__ for e in events] == ["StreamOpened", "DataReceived", "StreamEnded"]
