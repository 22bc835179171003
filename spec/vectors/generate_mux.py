"""Generate spec/vectors/mux.json: stream multiplexer frames (spec/transport.md §3.2-§3.9).

The bytes are assembled here with ``struct`` from the byte tables of the spec, not
with biopetals.protocol.mux, so the vectors check the code rather than echo it.
tests/test_vectors_mux.py checks both directions.

Valid vectors: one frame each; ``fields`` = {type, flags, stream_id, payload (hex)}.
Invalid vectors: ``hex`` is fed, from the start of a connection, to the multiplexer
of ``fields.receiver`` ("responder": the side that accepted the TCP connection,
which expects odd stream ids from its peer; "initiator": the dialling side).
The receiver MUST fail with ``error``.

Run from the repository root:  .venv/bin/python spec/vectors/generate_mux.py
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Values copied from spec/transport.md §3.1 (literal, so a code change cannot move them silently).
VERSION = 1
INITIAL_WINDOW = 256 * 1024
MAX_WINDOW = 16 * 1024 * 1024
MAX_DATA_PAYLOAD = 64 * 1024
MAX_PROTOCOL_NAME = 128
MAX_RESET_REASON = 512
TYPES = {"DATA": 0, "WINDOW_UPDATE": 1, "PING": 2, "GO_AWAY": 3, "OPEN": 4, "RESET": 5}
FLAGS = {"FIN": 0x1, "ACK": 0x2}

HEADER = struct.Struct(">BBHII")


def frame(kind: str, sid: int, payload: bytes = b"", flags: tuple[str, ...] = (), *, version: int = VERSION,
          type_value: int | None = None, length: int | None = None) -> bytes:
    bits = 0
    for f in flags:
        bits |= FLAGS[f]
    t = TYPES[kind] if type_value is None else type_value
    return HEADER.pack(version, t, bits, sid, len(payload) if length is None else length) + payload


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def valid(name: str, kind: str, sid: int, payload: bytes, flags: tuple[str, ...] = ()) -> dict:
    return {
        "name": name,
        "fields": {"type": kind, "flags": list(flags), "stream_id": sid, "payload": payload.hex()},
        "hex": frame(kind, sid, payload, flags).hex(),
    }


def invalid(name: str, data: bytes, error: str, rule: str, receiver: str = "responder") -> dict:
    return {"name": name, "fields": {"receiver": receiver}, "hex": data.hex(), "error": error, "rule": rule}


OPEN1 = frame("OPEN", 1, b"/biopetals/rpc/1")


def main() -> None:
    valid_vectors = [
        valid("OPEN stream 1 for /biopetals/rpc/1", "OPEN", 1, b"/biopetals/rpc/1"),
        valid("DATA with payload", "DATA", 1, b"\x00\x00\x00\x05hello"),
        valid("DATA empty with FIN (half-close)", "DATA", 1, b"", ("FIN",)),
        valid("DATA with payload and FIN", "DATA", 2, b"\x00\x00\x00\x02ok", ("FIN",)),
        valid("WINDOW_UPDATE of 131072", "WINDOW_UPDATE", 1, u32(131072)),
        valid("PING", "PING", 0, bytes.fromhex("0000000000000001")),
        valid("PING reply (ACK)", "PING", 0, bytes.fromhex("0000000000000001"), ("ACK",)),
        valid("RESET UNKNOWN_PROTOCOL with reason", "RESET", 2, u32(69) + b"no handler for '/x/1'"),
        valid("RESET without reason", "RESET", 1, u32(68)),
        valid("GO_AWAY normal", "GO_AWAY", 0, u32(0) + b"bye"),
    ]
    too_long_name = b"/" + b"a" * MAX_PROTOCOL_NAME
    invalid_vectors = [
        invalid("frame version 2", frame("PING", 0, bytes(8), version=2), "UNSUPPORTED_VERSION", "§3.2 version MUST be 1"),
        invalid("unknown frame type 9", frame("DATA", 1, b"", type_value=9), "MALFORMED", "§3.3 type MUST be 0-5"),
        invalid("ACK flag on DATA", OPEN1 + frame("DATA", 1, b"x", ("ACK",)), "MALFORMED", "§3.3 flags allowed per type"),
        invalid("FIN flag on OPEN", frame("OPEN", 1, b"/x/1", ("FIN",)), "MALFORMED", "§3.3 flags allowed per type"),
        invalid("undefined flag bit 0x80 on PING", HEADER.pack(1, 2, 0x80, 0, 8) + bytes(8), "MALFORMED", "§3.3 undefined flags MUST be 0"),
        invalid(
            "DATA header declaring more than MAX_DATA_PAYLOAD",
            OPEN1 + frame("DATA", 1, b"", length=MAX_DATA_PAYLOAD + 1),
            "LIMIT_EXCEEDED",
            "§3.1 DATA payload at most MAX_DATA_PAYLOAD (checked on the header)",
        ),
        invalid("WINDOW_UPDATE with 3-byte payload", OPEN1 + frame("WINDOW_UPDATE", 1, b"\x00\x00\x01"), "MALFORMED", "§3.3 WINDOW_UPDATE payload is 4 bytes"),
        invalid("PING with 4-byte payload", frame("PING", 0, bytes(4)), "MALFORMED", "§3.3 PING payload is 8 bytes"),
        invalid("PING on stream 1", frame("PING", 1, bytes(8)), "MALFORMED", "§3.3 PING and GO_AWAY use stream 0"),
        invalid("DATA on stream 0", frame("DATA", 0, b"x"), "MALFORMED", "§3.3 stream 0 carries only PING and GO_AWAY"),
        invalid("OPEN with empty protocol name", frame("OPEN", 1, b""), "MALFORMED", "§3.5 protocol name 1-128 bytes"),
        invalid("OPEN with 129-byte protocol name", frame("OPEN", 1, too_long_name), "LIMIT_EXCEEDED", "§3.5 protocol name at most 128 bytes"),
        invalid("OPEN with name not starting with /", frame("OPEN", 1, b"rpc/1"), "INVALID_FIELD", "§3.5 protocol name starts with '/'"),
        invalid("OPEN with a space in the name", frame("OPEN", 1, b"/rpc 1"), "INVALID_FIELD", "§3.5 protocol name is visible ASCII"),
        invalid("OPEN with non-ASCII name", frame("OPEN", 1, "/ρpc/1".encode()), "INVALID_FIELD", "§3.5 protocol name is visible ASCII"),
        invalid("RESET reason not UTF-8", OPEN1 + frame("RESET", 1, u32(68) + b"\xff\xfe"), "MALFORMED", "§3.7 reason is UTF-8"),
        invalid(
            "GO_AWAY reason longer than 512 bytes",
            frame("GO_AWAY", 0, u32(0) + b"x" * (MAX_RESET_REASON + 1)),
            "LIMIT_EXCEEDED",
            "§3.8 reason at most MAX_RESET_REASON bytes",
        ),
        invalid("DATA on a stream never opened", frame("DATA", 1, b"x"), "STREAM_STATE", "§3.7 frames only for opened streams"),
        invalid("WINDOW_UPDATE on a stream never opened", frame("WINDOW_UPDATE", 7, u32(1)), "STREAM_STATE", "§3.7 frames only for opened streams"),
        invalid("OPEN with the receiver's parity", frame("OPEN", 2, b"/x/1"), "STREAM_STATE", "§3.5 the initiator opens odd ids, the responder even"),
        invalid("OPEN with odd id to the initiator", frame("OPEN", 1, b"/x/1"), "STREAM_STATE", "§3.5 the initiator opens odd ids, the responder even", receiver="initiator"),
        invalid("OPEN id not increasing", frame("OPEN", 5, b"/x/1") + frame("OPEN", 3, b"/x/1"), "STREAM_STATE", "§3.5 stream ids strictly increase"),
        invalid("DATA after FIN", OPEN1 + frame("DATA", 1, b"", ("FIN",)) + frame("DATA", 1, b"x"), "STREAM_STATE", "§3.6 nothing after FIN"),
        invalid("OPEN after the sender's GO_AWAY", frame("GO_AWAY", 0, u32(0)) + OPEN1, "STREAM_STATE", "§3.8 no OPEN after sending GO_AWAY"),
        invalid(
            "WINDOW_UPDATE beyond MAX_WINDOW",
            OPEN1 + frame("WINDOW_UPDATE", 1, u32(MAX_WINDOW - INITIAL_WINDOW + 1)),
            "LIMIT_EXCEEDED",
            "§3.4 a send window never exceeds MAX_WINDOW",
        ),
    ]
    doc = {
        "spec": "spec/transport.md",
        "revision": 1,
        "description": (
            "Stream multiplexer frames (§3.2): 12-byte header version u8 | type u8 | flags u16 | stream id u32 | "
            "length u32, big-endian, then the payload. Invalid vectors are fed from the start of a connection to "
            "the multiplexer of fields.receiver, which MUST fail with the error. (A DATA frame beyond the receive "
            "window, §3.4, needs 256 KiB of payload; it is tested in tests/test_mux.py instead.)"
        ),
        "valid": valid_vectors,
        "invalid": invalid_vectors,
    }
    (HERE / "mux.json").write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
