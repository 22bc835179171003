"""Generate spec/vectors/messages.json: every node-protocol message, valid and invalid.

Run from the repository root:  .venv/bin/python spec/vectors/generate_messages.py
(``--check`` exits 1 if the committed file differs from what would be generated).

Three lists (spec/messages.md §9):

- ``valid``: canonical messages. Encoding ``fields`` gives ``hex`` exactly; decoding
  ``hex`` gives ``fields``.
- ``accepted``: non-canonical encodings a receiver MUST accept (§2.3, §2.4): decoding
  ``hex`` gives ``fields`` (re-encoding gives the canonical bytes instead).
- ``invalid``: decoding ``hex`` fails with exactly ``error``; ``rule`` names the
  section broken.

Invalid and accepted bytes are written by a small msgpack writer of this script
(``_pack``), independent of the implementation; for every valid vector the script
checks that this writer and ``encode_message`` agree byte for byte.

``fields_to_message`` / ``message_to_fields`` below are the JSON mapping that
tests/test_vectors_messages.py uses in both directions: bytes as hex, codecs by name,
hops as objects, absent optional fields left out, tensors as
``{"codec", "shape", "values"}``; all tensors of one vector share one codec.
"""

from __future__ import annotations

import dataclasses

import json
import struct
import sys
from pathlib import Path
from typing import Any

import torch
import zstandard

from biopetals.protocol.envelope import PROTOCOL_VERSION
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.fields import CodecName, PaddingMask, TensorKind
from biopetals.protocol.table import ArrayOf, Blob, MultiaddrText, Nested, PeerIdText
from biopetals.protocol.identity import Identity
from biopetals.protocol.messages import (
    FIRST_MESSAGES,
    MESSAGE_TYPES,
    SESSION_MESSAGES,
    Backward,
    BackwardResult,
    CloseSession,
    Error,
    Forward,
    ForwardResult,
    Hop,
    Message,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
    Push,
    PushAck,
    SessionClosed,
    SessionOpened,
    SetUpstream,
    KeepAlive,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from biopetals.protocol.tensors import Codec, encode_tensor
from biopetals.protocol.limits import MAX_SEQUENCE_LENGTH

OUT = Path(__file__).with_name("messages.json")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f16+zstd": torch.float16}
_BY_NAME = {cls.__name__: cls for cls in MESSAGE_TYPES.values()}

# ----------------------------------------------------------------------------- JSON mapping


def tensor_from_fields(fields: dict) -> torch.Tensor:
    values = [float(v) for v in fields["values"]]
    # float64 holds every value exactly; converting an exactly representable value is exact.
    return torch.tensor(values, dtype=torch.float64).to(DTYPES[fields["codec"]]).reshape(fields["shape"])


def tensor_to_fields(tensor: torch.Tensor, codec: str) -> dict:
    return {"codec": codec, "shape": list(tensor.shape), "values": [float(v) for v in tensor.flatten().tolist()]}


_DEFAULT_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _to_json(kind: Any, value: Any, codec: str | None) -> Any:
    if isinstance(kind, PaddingMask):  # [[0, 1, ...], ...]: one 0/1 per token, per row (§8.1)
        return [[int(v) for v in row] for row in value.to(torch.uint8).tolist()]
    if isinstance(kind, TensorKind):
        return tensor_to_fields(value, codec or _DEFAULT_NAMES[value.dtype])
    if isinstance(kind, Blob):
        return value.hex()
    if isinstance(kind, (PeerIdText, MultiaddrText)):
        return str(value)
    if isinstance(kind, CodecName):
        return value.value
    if isinstance(kind, ArrayOf):
        return [_to_json(kind.item, item, codec) for item in value]
    if isinstance(kind, Nested):
        return struct_to_fields(value, codec)
    return int(value) if isinstance(value, int) else value


def _from_json(kind: Any, value: Any) -> Any:
    if isinstance(kind, PaddingMask):
        return torch.tensor(value, dtype=torch.bool)
    if isinstance(kind, TensorKind):
        return tensor_from_fields(value)
    if isinstance(kind, Blob):
        return bytes.fromhex(value)
    if isinstance(kind, ArrayOf):
        return tuple(_from_json(kind.item, item) for item in value)
    if isinstance(kind, Nested):
        return struct_from_fields(kind.cls, value)
    return value  # codecs and error codes are normalised by the constructors


def struct_to_fields(obj: Any, codec: str | None) -> dict:
    out = {}
    for row in obj._table():
        value = getattr(obj, row.name)
        if row.optional and (value is None or value == ()):
            continue
        out[row.name] = _to_json(row.kind, value, codec)
    return out


def struct_from_fields(cls: type, fields: dict) -> Any:
    rows = {row.name: row for row in cls._table()}
    return cls(**{name: _from_json(rows[name].kind, value) for name, value in fields.items()})


def message_to_fields(message: Message, codec: str | None = None) -> dict:
    return {"type": type(message).__name__, **struct_to_fields(message, codec)}


def fields_to_message(fields: dict) -> Message:
    rest = dict(fields)
    return struct_from_fields(_BY_NAME[rest.pop("type")], rest)


def fields_codec(fields: Any) -> str | None:
    """The one codec the tensors of a vector use (None when it has no tensor)."""
    if isinstance(fields, dict):
        if "codec" in fields and "shape" in fields and "values" in fields:
            return fields["codec"]
        found = [fields_codec(value) for value in fields.values()]
    elif isinstance(fields, list):
        found = [fields_codec(value) for value in fields]
    else:
        return None
    names = {name for name in found if name is not None}
    assert len(names) <= 1, f"a vector mixes codecs {names}"
    return names.pop() if names else None


# ----------------------------------------------------------------------------- msgpack writer


class Raw(bytes):
    """Pre-encoded msgpack bytes spliced in as one value."""


class Pairs(list):
    """A map written from (key, value) pairs as given: any order, duplicates allowed."""


def _pack(obj: Any) -> bytes:
    """Canonical msgpack (spec/messages.md §2.3), written independently of msgpack-python."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if obj is None:
        return b"\xc0"
    if obj is True or obj is False:
        return b"\xc3" if obj else b"\xc2"
    if isinstance(obj, int):
        if 0 <= obj <= 0x7F:
            return bytes([obj])
        if -32 <= obj < 0:
            return struct.pack(">b", obj)
        if obj >= 0:
            for marker, fmt, top in ((0xCC, ">B", 0xFF), (0xCD, ">H", 0xFFFF), (0xCE, ">I", 0xFFFFFFFF)):
                if obj <= top:
                    return bytes([marker]) + struct.pack(fmt, obj)
            return b"\xcf" + struct.pack(">Q", obj)
        for marker, fmt, low in ((0xD0, ">b", -0x80), (0xD1, ">h", -0x8000), (0xD2, ">i", -0x80000000)):
            if obj >= low:
                return bytes([marker]) + struct.pack(fmt, obj)
        return b"\xd3" + struct.pack(">q", obj)
    if isinstance(obj, float):
        return b"\xcb" + struct.pack(">d", obj)
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _header(len(data), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + data
    if isinstance(obj, (bytes, bytearray)):
        return _header(len(obj), None, -1, (0xC4, 0xC5, 0xC6)) + bytes(obj)
    if isinstance(obj, (list, tuple)) and not isinstance(obj, Pairs):
        return _header(len(obj), 0x90, 15, (None, 0xDC, 0xDD)) + b"".join(_pack(x) for x in obj)
    if isinstance(obj, (dict, Pairs)):
        pairs = list(obj.items()) if isinstance(obj, dict) else list(obj)
        if isinstance(obj, dict):
            pairs.sort(key=lambda kv: kv[0])  # canonical: ascending keys
        return _header(len(pairs), 0x80, 15, (None, 0xDE, 0xDF)) + b"".join(_pack(k) + _pack(v) for k, v in pairs)
    raise TypeError(type(obj))


def _header(length: int, fix: int | None, fix_max: int, markers: tuple) -> bytes:
    if fix is not None and length <= fix_max:
        return bytes([fix | length])
    for marker, width in zip(markers, (1, 2, 4)):
        if marker is not None and length < (1 << (8 * width)):
            return bytes([marker]) + length.to_bytes(width, "big")
    raise ValueError(length)


def envelope(type_code: Any, body: Any, version: Any = PROTOCOL_VERSION) -> dict:
    return {0: version, 1: type_code, 2: body}


def body_of(message: Message, codec: str | None = None) -> dict:
    """The message's body as plain Python objects, ready to be mutated into an invalid one."""
    return message._encode_body(Codec(codec) if codec else None)


def packed(message: Message, codec: str | None = None, **changes: Any) -> bytes:
    """The message's envelope with body keys replaced (``k3=...``) or removed (``k3=DROP``)."""
    body = body_of(message, codec)
    for name, value in changes.items():
        key = int(name[1:])
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return _pack(envelope(message.TYPE, body))


DROP = object()

# ----------------------------------------------------------------------------- sample values

A = Identity.from_private_bytes(bytes([1]) * 32)
B = Identity.from_private_bytes(bytes([2]) * 32)
PEER_A, PEER_B = str(A.peer_id), str(B.peer_id)
SID = bytes(range(16))  # a 16-byte session id
SID2 = bytes(range(16, 32))
SID3 = bytes(range(32, 48))
MODEL = "aaditya/Llama3-OpenBioLLM-8B"

# [1, 2, 4] activations: values exact in f16, bf16 and f32.
H124 = [0.5, -1.25, 2.0, 0.0, 3.75, -0.125, 1024.0, -7.5]
H224 = H124 + [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0]


def t(shape: list[int], values: list[float] | None = None, codec: str = "f16") -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    if values is None:
        values = [float((i % 7) - 3) * 0.5 for i in range(count)]
    return tensor_from_fields({"codec": codec, "shape": shape, "values": values})


def hidden(codec: str = "f16") -> torch.Tensor:
    return t([1, 2, 4], H124, codec)


HOP_B = Hop(peer_id=PEER_B, addrs=(f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER_B}",), session_id=SID2, start=8, end=16)
HOP_A = Hop(peer_id=PEER_A, session_id=SID3, start=16, end=24)

STEP = Step(session_id=SID, step_id=0, position=0, hidden=hidden())
#: A left-padded batch of two: row 0 starts with one padding token (spec/messages.md §8.1).
MASK_22 = torch.tensor([[0, 1], [1, 1]], dtype=torch.bool)
STEP_22 = Step(session_id=SID, step_id=1, position=0, hidden=t([2, 2, 4], H224))
NODE_INFO = NodeInfo(
    version="biopetals/0.1.0",
    model=MODEL,
    start=0,
    end=16,
    dtype="bfloat16",
    quant="none",
    hidden_size=4096,
    cache_tokens_left=65536,
    inference_tps=12.5,
    forward_tps=1500.0,
)
OPEN = OpenSession(model=MODEL, start=0, end=8, max_length=2048, batch_size=1, codec=Codec.F16)
FORWARD = Forward(model=MODEL, start=0, end=2, codec=Codec.F32, hidden=hidden("f32"))
BACKWARD = Backward(
    model=MODEL, start=0, end=2, codec=Codec.F32, hidden=hidden("f32"), grad_outputs=t([1, 2, 4], None, "f32")
)
ERROR = Error(code=ErrorCode.BAD_POSITION, message="position 3 != 5 tokens in cache", step_id=7)


def valid_messages() -> list[tuple[str, Message, str | None]]:
    """(name, message, codec) — codec None: each tensor losslessly by its dtype."""
    return [
        ("NodeInfoRequest (spec/messages.md §2.2 example)", NodeInfoRequest(), None),
        ("NodeInfo", NODE_INFO, None),
        (
            "NodeInfo with uint64 cache tokens, zero throughput, unknown labels",
            NodeInfo(
                version="x",
                model="m",
                start=1023,
                end=1024,
                dtype="float8_e4m3",
                quant="awq",
                hidden_size=65536,
                cache_tokens_left=(1 << 64) - 1,
                inference_tps=0.0,
                forward_tps=0.1,
            ),
            None,
        ),
        (
            "NodeInfo with the optional load fields (§4.2, keys 10-13)",
            dataclasses.replace(NODE_INFO, sessions_open=3, decode_steps=(1 << 40) + 7, batched_steps=0, uptime=86400.5),
            None,
        ),
        (
            "NodeInfo listing server-side adapters (§4.2, key 14)",
            dataclasses.replace(NODE_INFO, adapters=("bio-lora", "a" * 64)),
            None,
        ),
        ("OpenSession, node chooses the session id", OPEN, None),
        ("OpenSession with an adapter (§5.1, key 7)", dataclasses.replace(OPEN, adapter="bio-lora"), None),
        (
            "OpenSession with client session id, batch 64, max_length 8192, f16+zstd",
            OpenSession(
                model=MODEL, start=8, end=16, max_length=8192, batch_size=64, codec=Codec.F16_ZSTD, session_id=SID2
            ),
            None,
        ),
        ("SessionOpened", SessionOpened(session_id=SID, idle_timeout=300.0), None),
        ("OpenSession naming its upstream (§5.10, key 8)", dataclasses.replace(OPEN, upstream=PEER_A), None),
        (
            "SessionOpened echoing the upstream (§5.10, key 2)",
            SessionOpened(session_id=SID, idle_timeout=300.0, upstream=PEER_A),
            None,
        ),
        (
            "NodeInfo saying its sessions roll back (§4.2, key 15, revision 4)",
            dataclasses.replace(NODE_INFO, rollback=1),
            None,
        ),
        (
            "SessionOpened saying the session rolls back (§5.2, key 3, revision 4)",
            SessionOpened(session_id=SID, idle_timeout=300.0, upstream=PEER_A, rollback=1),
            None,
        ),
        (
            "Step with truncate: roll the cache back to position 5 first (§5.6.1, key 7)",
            Step(session_id=SID, step_id=12, position=5, hidden=hidden(), truncate=1),
            "f16",
        ),
        (
            "Push with truncate and a padding mask (§5.6.1, §5.7)",
            Push(session_id=SID2, step_id=13, position=3, hidden=t([2, 2, 4], H224), mask=MASK_22, truncate=1),
            "f16",
        ),
        (
            "NodeInfo saying its sessions accept KeepAlive (§4.2, key 16, revision 5)",
            dataclasses.replace(NODE_INFO, rollback=1, keepalive=1),
            None,
        ),
        (
            "SessionOpened saying the session accepts KeepAlive (§5.2, key 4, revision 5)",
            SessionOpened(session_id=SID, idle_timeout=60.0, upstream=PEER_A, rollback=1, keepalive=1),
            None,
        ),
        ("KeepAlive (§5.9, type 17, revision 5)", KeepAlive(session_id=SID), None),
        ("SetUpstream naming a new upstream (§5.10)", SetUpstream(session_id=SID, upstream=PEER_B), None),
        ("SetUpstream without upstream: no node may push (§5.10)", SetUpstream(session_id=SID), None),
        ("Step [1, 2, 4] f16 at position 0", STEP, "f16"),
        ("Step [1, 2, 4] f32", Step(session_id=SID, step_id=1, position=5, hidden=hidden("f32")), "f32"),
        ("Step [1, 2, 4] bf16", Step(session_id=SID, step_id=2, position=5, hidden=hidden("bf16")), "bf16"),
        (
            "Step [2, 2, 4] f16+zstd",
            Step(session_id=SID, step_id=3, position=100, hidden=t([2, 2, 4], H224, "f16+zstd")),
            "f16+zstd",
        ),
        (
            "Step with per-block prompts, no push",
            Step(session_id=SID, step_id=4, position=0, hidden=hidden(), prompts=t([8, 1, 1, 4])),
            "f16",
        ),
        (
            "Step with push chain of two hops",
            Step(session_id=SID, step_id=2**40, position=8190, hidden=hidden(), next=(HOP_B, HOP_A)),
            "f16",
        ),
        (
            "Step with prompts covering own span and hops",
            Step(session_id=SID, step_id=9, position=0, hidden=hidden(), prompts=t([24, 1, 2, 4]), next=(HOP_B, HOP_A)),
            "f16",
        ),
        (
            "Step [2, 2, 4] with a padding mask (row 0 left-padded)",
            Step(session_id=SID, step_id=1, position=0, hidden=t([2, 2, 4], H224), mask=MASK_22),
            "f16",
        ),
        (
            "Step with a padding mask and a push hop",
            Step(session_id=SID, step_id=7, position=3, hidden=t([2, 2, 4], H224), next=(HOP_A,), mask=MASK_22),
            "f16",
        ),
        ("StepResult", StepResult(session_id=SID, step_id=0, hidden=hidden()), "f16"),
        ("CloseSession", CloseSession(session_id=SID), None),
        ("SessionClosed", SessionClosed(session_id=SID), None),
        (
            "Push with remaining hop",
            Push(session_id=SID2, step_id=0, position=0, hidden=hidden(), next=(HOP_A,)),
            "f16",
        ),
        ("PushAck", PushAck(session_id=SID2, step_id=0), None),
        ("Forward f32", FORWARD, "f32"),
        (
            "Forward with prompts",
            Forward(model=MODEL, start=3, end=5, codec=Codec.F16, hidden=hidden(), prompts=t([2, 1, 1, 4])),
            "f16",
        ),
        (
            "Forward with a padding mask",
            Forward(model=MODEL, start=0, end=2, codec=Codec.F32, hidden=t([2, 2, 4], H224, "f32"), mask=MASK_22),
            "f32",
        ),
        ("Forward with an adapter (§6.1, key 7)", dataclasses.replace(FORWARD, adapter="bio-lora"), "f32"),
        ("ForwardResult", ForwardResult(hidden=hidden("f32")), "f32"),
        ("Backward f32", BACKWARD, "f32"),
        (
            "Backward with prompts",
            Backward(
                model=MODEL,
                start=0,
                end=2,
                codec=Codec.BF16,
                hidden=hidden("bf16"),
                grad_outputs=t([1, 2, 4], None, "bf16"),
                prompts=t([2, 1, 2, 4], None, "bf16"),
            ),
            "bf16",
        ),
        (
            "Backward with a padding mask",
            Backward(
                model=MODEL,
                start=0,
                end=2,
                codec=Codec.F32,
                hidden=t([2, 2, 4], H224, "f32"),
                grad_outputs=t([2, 2, 4], None, "f32"),
                mask=MASK_22,
            ),
            "f32",
        ),
        ("Backward with an adapter (§6.2, key 8)", dataclasses.replace(BACKWARD, adapter="bio-lora"), "f32"),
        ("BackwardResult", BackwardResult(grad_inputs=hidden("f32")), "f32"),
        (
            "BackwardResult with grad_prompts",
            BackwardResult(grad_inputs=hidden("f32"), grad_prompts=t([2, 1, 1, 4], None, "f32")),
            "f32",
        ),
        ("Error with step id", ERROR, None),
        ("Error, empty text, no step id", Error(code=ErrorCode.BUSY, message=""), None),
        ("Error UNKNOWN_ADAPTER", Error(code=ErrorCode.UNKNOWN_ADAPTER, message="adapter 'x' is not loaded here"), None),
        (
            "Error FORBIDDEN for a Push from a peer that is not the upstream (§5.10)",
            Error(code=ErrorCode.FORBIDDEN, message="peer may not push into this session", step_id=9),
            None,
        ),
        ("Error with a code from a newer peer", Error(code=999, message="new"), None),
    ]


def accepted_vectors() -> list[dict]:
    """Non-canonical encodings a receiver MUST decode to the canonical message."""
    out = []

    def add(name: str, rule: str, data: bytes, message: Message, codec: str | None = None) -> None:
        out.append({"name": name, "rule": rule, "fields": message_to_fields(message, codec), "hex": data.hex()})

    add("unknown envelope key 3 ignored", "§2.4", _pack({0: PROTOCOL_VERSION, 1: 7, 2: {0: SID}, 3: "later"}), CloseSession(session_id=SID))
    add(
        "unknown body keys ignored, any value",
        "§2.4",
        _pack(envelope(7, {0: SID, 9: {0: [1, 2.5, None, True, "s"]}, 200: b"\x00", 201: -3.5})),
        CloseSession(session_id=SID),
    )
    add(
        "unknown hop key ignored",
        "§2.4",
        _pack(envelope(5, {**body_of(STEP, "f16"), 5: [{**HOP_A._encode_body(None), 7: True}]})),
        Step(session_id=SID, step_id=0, position=0, hidden=hidden(), next=(HOP_A,)),
        "f16",
    )
    add(
        "all-ones padding mask means no mask",
        "§8.1 (absent and all-ones are the same mask; senders omit it)",
        _pack(envelope(5, {**body_of(STEP_22, "f16"), 6: b"\x01\x01\x01\x01"})),
        STEP_22,
        "f16",
    )
    add(
        "nil padding mask is absent",
        "§2.3",
        _pack(envelope(11, {**body_of(FORWARD, "f32"), 6: None})),
        FORWARD,
        "f32",
    )
    add(
        "envelope keys in descending order",
        "§2.3",
        _pack(Pairs([(2, {0: SID}), (1, 7), (0, PROTOCOL_VERSION)])),
        CloseSession(session_id=SID),
    )
    add(
        "integers in longer formats (uint 16, uint 64, int 8)",
        "§2.3",
        _pack(
            envelope(
                Raw(b"\xcd\x00\x0a"),
                {0: SID2, 1: Raw(b"\xcf" + (5).to_bytes(8, "big"))},
                version=Raw(b"\xd0" + bytes([PROTOCOL_VERSION])),
            )
        ),
        PushAck(session_id=SID2, step_id=5),
    )
    add(
        "float 32 for a float field",
        "§2.3",
        _pack(envelope(4, {0: SID, 1: Raw(b"\xca" + struct.pack(">f", 300.0))})),
        SessionOpened(session_id=SID, idle_timeout=300.0),
    )
    add(
        "nil for an absent optional field",
        "§2.3",
        _pack(envelope(3, {**body_of(OPEN), 6: None})),
        OPEN,
    )
    add("empty optional array", "§2.3", _pack(envelope(5, {**body_of(STEP, "f16"), 5: []})), STEP, "f16")
    add(
        "str 8 format for a short string",
        "§2.3",
        _pack(envelope(15, {0: 22, 1: Raw(b"\xd9\x02hi")})),
        Error(code=ErrorCode.BUSY, message="hi"),
    )
    add(
        "MAX_MESSAGE_OBJECTS objects exactly",
        "§1.2, §2.5 step 2",
        _pack(envelope(7, {0: SID, 9: [[None] * 1000] * 4 + [[None] * 80]})),
        CloseSession(session_id=SID),
    )
    add(
        "nesting MAX_MESSAGE_DEPTH deep exactly",
        "§1.2, §2.5 step 2",
        _pack(envelope(7, {0: SID, 9: Raw(b"\x91" * 14 + b"\xc0")})),
        CloseSession(session_id=SID),
    )
    return out


def invalid_vectors() -> list[tuple[str, bytes, ErrorCode, str]]:
    E = ErrorCode
    step_body = body_of(STEP, "f16")
    hop_b = HOP_B._encode_body(None)
    good = encode_message(STEP)
    f16 = lambda shape, values=None: encode_tensor(t(shape, values), Codec.F16)  # noqa: E731
    # Large shapes as compressed zeros keep the file small; any zstd decodes them.
    zeros = lambda shape: encode_tensor(torch.zeros(shape, dtype=torch.float16), Codec.F16_ZSTD)  # noqa: E731
    nan = float("nan")
    v: list[tuple[str, bytes, ErrorCode, str]] = [
        # --- §2.5 steps 1-3: msgpack structure
        ("empty payload", b"", E.MALFORMED, "§2.5 step 2: input ends inside an object"),
        ("reserved byte 0xc1", b"\xc1", E.MALFORMED, "§2.5 step 2: reserved byte"),
        ("truncated message", good[:-1], E.MALFORMED, "§2.5 step 2: input ends inside an object"),
        ("trailing byte after the message", good + b"\x00", E.MALFORMED, "§2.5 step 2: trailing bytes"),
        ("two messages in one payload", good + good, E.MALFORMED, "§2.2: exactly one object"),
        (
            "bin 32 declaring 4 GiB in a short payload",
            _pack(envelope(7, {0: Raw(b"\xc6\xff\xff\xff\xff")})),
            E.MALFORMED,
            "§2.5 step 2: input ends inside an object",
        ),
        (
            "array 32 header of 2**32-1 entries",
            _pack(envelope(7, {0: SID, 9: Raw(b"\xdd\xff\xff\xff\xff")})),
            E.LIMIT_EXCEEDED,
            "§2.5 step 2: container over MAX_MSGPACK_CONTAINER, before reading it",
        ),
        (
            "map 16 of 1025 entries",
            _pack(envelope(7, {0: SID, 9: Raw(b"\xde\x04\x01")})),
            E.LIMIT_EXCEEDED,
            "§2.5 step 2: container over MAX_MSGPACK_CONTAINER",
        ),
        (
            "str of 1025 bytes under an unknown key",
            _pack(envelope(7, {0: SID, 9: "x" * 1025})),
            E.LIMIT_EXCEEDED,
            "§2.5 step 2: str over MAX_MSGPACK_CONTAINER",
        ),
        (
            "ext 16 of 1025 bytes under an unknown key",
            _pack(envelope(7, {0: SID, 9: Raw(b"\xc8\x04\x01\x05" + bytes(1025))})),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        (
            "4097 objects",
            _pack(envelope(7, {0: SID, 9: [[None] * 1000] * 4 + [[None] * 81]})),
            E.LIMIT_EXCEEDED,
            "§2.5 step 2: more than MAX_MESSAGE_OBJECTS",
        ),
        (
            "arrays nested 17 deep",
            _pack(envelope(7, {0: SID, 9: Raw(b"\x91" * 15 + b"\xc0")})),
            E.LIMIT_EXCEEDED,
            "§2.5 step 2: deeper than MAX_MESSAGE_DEPTH",
        ),
        (
            "invalid UTF-8 in a str",
            _pack(envelope(15, {0: 4, 1: Raw(b"\xa2\xff\xfe")})),
            E.MALFORMED,
            "§2.5 step 3: invalid UTF-8",
        ),
        (
            "timestamp 32 under an unknown key",
            _pack(envelope(7, {0: SID, 9: Raw(b"\xd6\xff\x00\x00\x00\x01")})),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        (
            "ext 8 of application type 5",
            _pack(envelope(7, {0: SID, 9: Raw(b"\xc7\x02\x05\x00\x00")})),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        (
            "ext of reserved type -111 (fuzzer find, scan_msgpack)",
            bytes.fromhex("8300010107028200c410000102030405060708090a0b0c0d0e0f09c70591d950000000"),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        (
            "timestamp 64 with nanoseconds over 999999999 (fuzzer find, scan_msgpack)",
            _pack(envelope(7, {0: SID, 9: Raw(bytes.fromhex("d7ffffffffffffffff2e"))})),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        (
            "ext as a map key",
            _pack(envelope(7, Pairs([(0, SID), (Raw(b"\xd4\x01\x00"), 1)]))),
            E.MALFORMED,
            "§2.5 step 2: ext format",
        ),
        ("top level is an array", _pack([1, 7, {0: SID}]), E.MALFORMED, "§2.5 step 3: not a map"),
        ("top level is an integer", b"\x07", E.MALFORMED, "§2.5 step 3: not a map"),
        (
            "str key in the envelope",
            _pack(Pairs([(0, PROTOCOL_VERSION), (1, 7), (2, {0: SID}), ("x", 1)])),
            E.MALFORMED,
            "§2.5 step 3: non-uint key",
        ),
        (
            "negative key in the body",
            _pack(envelope(7, Pairs([(0, SID), (-1, 0)]))),
            E.MALFORMED,
            "§2.5 step 3: non-uint key",
        ),
        (
            "true as a key",
            _pack(envelope(7, Pairs([(0, SID), (True, 0)]))),
            E.MALFORMED,
            "§2.5 step 3: non-uint key",
        ),
        (
            "duplicate key in the body",
            _pack(envelope(7, Pairs([(0, SID), (0, SID2)]))),
            E.MALFORMED,
            "§2.5 step 3: duplicate key",
        ),
        (
            "duplicate key in the envelope",
            _pack(Pairs([(0, PROTOCOL_VERSION), (1, 7), (2, {0: SID}), (1, 8)])),
            E.MALFORMED,
            "§2.5 step 3: duplicate key",
        ),
        (
            "duplicate key in a tensor map",
            packed(STEP, "f16", k3=Pairs([(0, "f16"), (1, [1, 1, 1]), (2, bytes(2)), (2, bytes(2))])),
            E.MALFORMED,
            "§2.5 step 3: duplicate key",
        ),
        (
            "str key in a hop map",
            packed(STEP, "f16", k5=[Pairs([*hop_b.items(), ("x", 1)])]),
            E.MALFORMED,
            "§2.5 step 3: non-uint key",
        ),
        # --- §2.5 steps 4-6: envelope
        ("version absent", _pack({1: 7, 2: {0: SID}}), E.MALFORMED, "§2.5 step 4"),
        ("version is a str", _pack(envelope(7, {0: SID}, version="1")), E.MALFORMED, "§2.5 step 4"),
        ("version is a float", _pack(envelope(7, {0: SID}, version=1.0)), E.MALFORMED, "§2.5 step 4"),
        ("version 1", _pack(envelope(7, {0: SID}, version=1)), E.UNSUPPORTED_VERSION, "§2.4, §2.5 step 4, §5.10"),
        ("version 3", _pack(envelope(7, {0: SID}, version=3)), E.UNSUPPORTED_VERSION, "§2.4, §2.5 step 4"),
        ("version 0", _pack(envelope(7, {0: SID}, version=0)), E.UNSUPPORTED_VERSION, "§2.5 step 4"),
        (
            "version 3 with an envelope of another shape",
            _pack({0: 3, 5: "anything"}),
            E.UNSUPPORTED_VERSION,
            "§2.4: nothing after the version is interpreted",
        ),
        ("type absent", _pack({0: PROTOCOL_VERSION, 2: {0: SID}}), E.MALFORMED, "§2.5 step 5"),
        ("type negative", _pack(envelope(-1, {0: SID})), E.MALFORMED, "§2.5 step 5"),
        ("type 0", _pack(envelope(0, {})), E.UNKNOWN_MESSAGE, "§2.5 step 5, §3"),
        ("type 18", _pack(envelope(18, {})), E.UNKNOWN_MESSAGE, "§2.5 step 5, §3"),
        ("type 300", _pack(envelope(300, {})), E.UNKNOWN_MESSAGE, "§2.5 step 5, §3"),
        ("body absent", _pack({0: PROTOCOL_VERSION, 1: 1}), E.MALFORMED, "§2.5 step 6"),
        ("body is an array", _pack(envelope(1, [])), E.MALFORMED, "§2.5 step 6"),
        ("body is nil", _pack(envelope(1, None)), E.MALFORMED, "§2.5 step 6"),
        # --- §2.5 step 7a-b: presence and type of fields
        ("Step without session_id", packed(STEP, "f16", k0=DROP), E.INVALID_FIELD, "§2.5 step 7a, §5.3"),
        ("Step without hidden", packed(STEP, "f16", k3=DROP), E.INVALID_FIELD, "§2.5 step 7a, §5.3"),
        ("Step with nil step_id", packed(STEP, "f16", k1=None), E.INVALID_FIELD, "§2.5 step 7a"),
        ("NodeInfo without forward_tps", packed(NODE_INFO, k9=DROP), E.INVALID_FIELD, "§2.5 step 7a, §4.2"),
        ("NodeInfo with a negative uptime", packed(NODE_INFO, k13=-1.0), E.INVALID_FIELD, "§4.2 uptime"),
        ("NodeInfo with sessions_open as a string", packed(NODE_INFO, k10="3"), E.INVALID_FIELD, "§4.2 sessions_open"),
        ("Error without code", packed(ERROR, k0=DROP), E.INVALID_FIELD, "§2.5 step 7a, §7.1"),
        ("Hop without peer_id", packed(STEP, "f16", k5=[{k: x for k, x in hop_b.items() if k}]), E.INVALID_FIELD, "§5.4"),
        ("uint field given a str", packed(STEP, "f16", k1="1"), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("uint field given true", packed(STEP, "f16", k2=True), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("uint field given a float", packed(OPEN, k3=2048.0), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("float field given an int", packed(NODE_INFO, k8=12), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("str field given bin", packed(OPEN, k0=MODEL.encode()), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("bin field given str", packed(STEP, "f16", k0="session"), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("array field given a map", packed(STEP, "f16", k5={0: 1}), E.INVALID_FIELD, "§2.5 step 7b, §1.1"),
        ("hop given an array", packed(STEP, "f16", k5=[[PEER_B]]), E.INVALID_FIELD, "§2.5 step 7d, §5.4"),
        ("addrs item given bin", packed(STEP, "f16", k5=[{**hop_b, 1: [b"/ip4"]}]), E.INVALID_FIELD, "§5.4"),
        ("tensor given bin", packed(STEP, "f16", k3=bytes(16)), E.INVALID_FIELD, "§2.5 step 7d, spec/tensors.md §3.3"),
        ("codec given an int", packed(OPEN, k5=2), E.INVALID_FIELD, "§2.5 step 7b, §5.1"),
        # --- §2.5 step 7c: ranges
        ("negative position", packed(STEP, "f16", k2=-1), E.BAD_POSITION, "§5.3 position low"),
        ("position MAX_SEQUENCE_LENGTH", packed(STEP, "f16", k2=MAX_SEQUENCE_LENGTH), E.BAD_POSITION, "§5.3 position high"),
        ("negative step_id", packed(STEP, "f16", k1=-5), E.INVALID_FIELD, "§5.3 step_id"),
        ("empty session id", packed(STEP, "f16", k0=b""), E.INVALID_FIELD, "§5.3 session_id low"),
        ("session id of 65 bytes", packed(STEP, "f16", k0=bytes(65)), E.LIMIT_EXCEEDED, "§5.3 session_id high"),
        ("OpenSession session id of 65 bytes", packed(OPEN, k6=bytes(65)), E.LIMIT_EXCEEDED, "§5.1 session_id high"),
        ("max_length 0", packed(OPEN, k3=0), E.INVALID_FIELD, "§5.1 max_length low"),
        ("max_length over MAX_SEQUENCE_LENGTH", packed(OPEN, k3=MAX_SEQUENCE_LENGTH + 1), E.LIMIT_EXCEEDED, "§5.1 max_length high"),
        ("batch_size 0", packed(OPEN, k4=0), E.INVALID_FIELD, "§5.1 batch_size low"),
        ("batch_size over MAX_BATCH", packed(OPEN, k4=65), E.LIMIT_EXCEEDED, "§5.1 batch_size high"),
        ("start at MAX_BLOCKS", packed(OPEN, k1=1024, k2=1024), E.INVALID_FIELD, "§5.1 start high"),
        ("end 0", packed(OPEN, k2=0), E.INVALID_FIELD, "§5.1 end low"),
        ("end over MAX_BLOCKS", packed(OPEN, k2=1025), E.INVALID_FIELD, "§5.1 end high"),
        ("empty model name", packed(OPEN, k0=""), E.INVALID_FIELD, "§5.1 model low"),
        ("model name of 257 bytes", packed(OPEN, k0="m" * 257), E.LIMIT_EXCEEDED, "§5.1 model high"),
        ("unknown codec name", packed(OPEN, k5="f8"), E.DTYPE_MISMATCH, "§5.1 codec"),
        ("Forward unknown codec name", packed(FORWARD, "f32", k3="F16"), E.DTYPE_MISMATCH, "§6.1 codec"),
        ("Forward with an empty adapter name", packed(FORWARD, "f32", k7=""), E.INVALID_FIELD, "§6.1 adapter low"),
        ("Forward adapter name of 65 bytes", packed(FORWARD, "f32", k7="a" * 65), E.LIMIT_EXCEEDED, "§6.1 adapter high"),
        ("Backward adapter name given bin", packed(BACKWARD, "f32", k8=b"bio"), E.INVALID_FIELD, "§6.2 adapter type"),
        ("OpenSession adapter given an int", packed(OPEN, k7=1), E.INVALID_FIELD, "§5.1 adapter type"),
        ("Step truncate 0", packed(STEP, "f16", k7=0), E.INVALID_FIELD, "§5.3 truncate low, §5.6.1"),
        ("Step truncate 2", packed(STEP, "f16", k7=2), E.INVALID_FIELD, "§5.3 truncate high, §5.6.1"),
        ("Step truncate given true", packed(STEP, "f16", k7=True), E.INVALID_FIELD, "§5.3 truncate type"),
        ("Push truncate given bin", packed(Push(session_id=SID2, step_id=0, position=0, hidden=hidden()), "f16",
                                           k7=b"\x01"), E.INVALID_FIELD, "§5.3 truncate type, §5.7"),
        ("SessionOpened rollback 0", packed(SessionOpened(session_id=SID, idle_timeout=1.0), k3=0), E.INVALID_FIELD,
         "§5.2 rollback low"),
        ("NodeInfo rollback 2", packed(NODE_INFO, k15=2), E.INVALID_FIELD, "§4.2 rollback high"),
        ("SessionOpened keepalive 0", packed(SessionOpened(session_id=SID, idle_timeout=1.0), k4=0), E.INVALID_FIELD,
         "§5.2 keepalive low"),
        ("NodeInfo keepalive 2", packed(NODE_INFO, k16=2), E.INVALID_FIELD, "§4.2 keepalive high"),
        ("SessionOpened keepalive given true", packed(SessionOpened(session_id=SID, idle_timeout=1.0), k4=True),
         E.INVALID_FIELD, "§5.2 keepalive type"),
        ("KeepAlive without session_id", packed(KeepAlive(session_id=SID), k0=DROP), E.INVALID_FIELD,
         "§5.9 KeepAlive session_id"),
        ("KeepAlive empty session_id", packed(KeepAlive(session_id=SID), k0=b""), E.INVALID_FIELD,
         "§5.9 KeepAlive session_id low"),
        ("KeepAlive session_id of 65 bytes", packed(KeepAlive(session_id=SID), k0=b"s" * 65), E.LIMIT_EXCEEDED,
         "§5.9 KeepAlive session_id high"),
        ("KeepAlive session_id given str", packed(KeepAlive(session_id=SID), k0="sid"), E.INVALID_FIELD,
         "§5.9 KeepAlive session_id type"),
        ("OpenSession upstream not a peer id", packed(OPEN, k8="12D3KooW0OIl"), E.INVALID_FIELD, "§5.1 upstream, §5.10"),
        ("OpenSession upstream given bin", packed(OPEN, k8=PEER_A.encode()), E.INVALID_FIELD, "§5.1 upstream type"),
        ("OpenSession upstream empty", packed(OPEN, k8=""), E.INVALID_FIELD, "§5.1 upstream low"),
        ("OpenSession upstream of 129 bytes", packed(OPEN, k8="1" * 129), E.LIMIT_EXCEEDED, "§5.1 upstream high"),
        ("SetUpstream without session_id", packed(SetUpstream(session_id=SID, upstream=PEER_A), k0=DROP),
         E.INVALID_FIELD, "§5.10 session_id"),
        ("SetUpstream upstream not a peer id", packed(SetUpstream(session_id=SID), k1="not-a-peer"), E.INVALID_FIELD,
         "§5.10 upstream"),
        ("SessionOpened upstream not a peer id", packed(SessionOpened(session_id=SID, idle_timeout=1.0), k2="x"),
         E.INVALID_FIELD, "§5.2 upstream"),
        ("NodeInfo with 9 adapters", packed(NODE_INFO, k14=[f"a{i}" for i in range(9)]), E.LIMIT_EXCEEDED, "§4.2 adapters high"),
        ("negative throughput", packed(NODE_INFO, k8=-1.0), E.INVALID_FIELD, "§4.2 inference_tps"),
        ("NaN throughput", packed(NODE_INFO, k9=nan), E.INVALID_FIELD, "§4.2 forward_tps finite"),
        ("infinite throughput", packed(NODE_INFO, k8=float("inf")), E.INVALID_FIELD, "§4.2 finite"),
        ("hidden_size 0", packed(NODE_INFO, k6=0), E.INVALID_FIELD, "§4.2 hidden_size low"),
        ("hidden_size over MAX_HIDDEN_SIZE", packed(NODE_INFO, k6=65537), E.INVALID_FIELD, "§4.2 hidden_size high"),
        ("empty dtype label", packed(NODE_INFO, k4=""), E.INVALID_FIELD, "§4.2 dtype low"),
        ("quant label of 65 bytes", packed(NODE_INFO, k5="q" * 65), E.LIMIT_EXCEEDED, "§4.2 quant high"),
        ("idle_timeout 0", packed(SessionOpened(session_id=SID, idle_timeout=1.0), k1=0.0), E.INVALID_FIELD, "§5.2"),
        ("error code 0", packed(ERROR, k0=0), E.INVALID_FIELD, "§7.1 code low"),
        ("error code 65536", packed(ERROR, k0=65536), E.INVALID_FIELD, "§7.1 code high"),
        ("error text of 1024 + 1 bytes", packed(ERROR, k1="é" * 512 + "x"), E.LIMIT_EXCEEDED, "§7.1 message high"),
        ("65 hops", packed(STEP, "f16", k5=[hop_b] * 65), E.LIMIT_EXCEEDED, "§5.3 next high"),
        ("17 addrs in a hop", packed(STEP, "f16", k5=[{**hop_b, 1: ["/ip4/1.2.3.4"] * 17}]), E.LIMIT_EXCEEDED, "§5.4 addrs"),
        ("empty multiaddr", packed(STEP, "f16", k5=[{**hop_b, 1: [""]}]), E.INVALID_FIELD, "§5.4 addrs item low"),
        ("multiaddr of 257 bytes", packed(STEP, "f16", k5=[{**hop_b, 1: ["/" * 257]}]), E.LIMIT_EXCEEDED, "§5.4"),
        ("peer id of 129 bytes", packed(STEP, "f16", k5=[{**hop_b, 0: "1" * 129}]), E.LIMIT_EXCEEDED, "§5.4 peer_id"),
        ("peer id not base58", packed(STEP, "f16", k5=[{**hop_b, 0: "12D3KooW0OIl"}]), E.INVALID_FIELD, "§5.4 peer_id"),
        (
            "peer id of another key type",
            packed(STEP, "f16", k5=[{**hop_b, 0: "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"}]),
            E.INVALID_FIELD,
            "§5.4 peer_id, spec/transport.md §1.3",
        ),
        (
            "multiaddr that does not parse",
            packed(STEP, "f16", k5=[{**hop_b, 1: ["/ip4/10.0.0.2/udp/31337"]}]),
            E.INVALID_FIELD,
            "§5.4 addrs, spec/transport.md §1.7",
        ),
        (
            "multiaddr naming another peer",
            packed(STEP, "f16", k5=[{**hop_b, 1: [f"/ip4/10.0.0.2/tcp/31337/p2p/{PEER_A}"]}]),
            E.INVALID_FIELD,
            "§5.4 cross-field rule",
        ),
        ("hop session id empty", packed(STEP, "f16", k5=[{**hop_b, 2: b""}]), E.INVALID_FIELD, "§5.4 session_id"),
        # --- §2.5 step 8: cross-field rules
        ("OpenSession start == end", packed(OPEN, k1=8), E.INVALID_FIELD, "§5.1 start < end"),
        ("Forward start > end", packed(FORWARD, "f32", k1=5, k2=3), E.INVALID_FIELD, "§6.1 start < end"),
        ("NodeInfo start == end", packed(NODE_INFO, k2=16), E.INVALID_FIELD, "§4.2 start < end"),
        ("hop start == end", packed(STEP, "f16", k5=[{**hop_b, 3: 16}]), E.INVALID_FIELD, "§5.4 start < end"),
        (
            "hops with a gap",
            packed(STEP, "f16", k5=[hop_b, {**HOP_A._encode_body(None), 3: 17, 4: 24}]),
            E.INVALID_FIELD,
            "§5.3 rule 3",
        ),
        ("position + tokens over MAX_SEQUENCE_LENGTH", packed(STEP, "f16", k2=MAX_SEQUENCE_LENGTH - 1), E.BAD_POSITION, "§5.3 rule 1"),
        # --- §8 tensors and §7.3 finiteness
        ("hidden of rank 2", packed(STEP, "f16", k3=f16([2, 4])), E.INVALID_TENSOR, "§8 rank"),
        ("hidden of rank 4", packed(STEP, "f16", k3=f16([1, 1, 2, 4])), E.INVALID_TENSOR, "§8 rank"),
        ("hidden with batch 0", packed(STEP, "f16", k3=f16([0, 2, 4])), E.INVALID_TENSOR, "§8 zero dimension"),
        ("hidden with 0 tokens", packed(STEP, "f16", k3=f16([1, 0, 4])), E.INVALID_TENSOR, "§8 zero dimension"),
        ("hidden with batch over MAX_BATCH", packed(STEP, "f16", k3=f16([65, 1, 1])), E.LIMIT_EXCEEDED, "§8 batch"),
        (
            "hidden with tokens over MAX_SEQUENCE_LENGTH",
            packed(FORWARD, "f16", k4=zeros([1, MAX_SEQUENCE_LENGTH + 1, 1])),
            E.LIMIT_EXCEEDED,
            "§8 tokens",
        ),
        (
            "hidden size over MAX_HIDDEN_SIZE",
            packed(StepResult(session_id=SID, step_id=0, hidden=hidden()), "f16", k2=zeros([1, 1, 65537])),
            E.LIMIT_EXCEEDED,
            "§8 hidden",
        ),
        (
            "prompts with blocks over MAX_BLOCKS",
            packed(STEP, "f16", k4=f16([1025, 1, 1, 4])),
            E.LIMIT_EXCEEDED,
            "§8 blocks",
        ),
        (
            "tensor over MAX_TENSOR_ELEMENTS, declared only",
            packed(STEP, "f16", k3={0: "f16", 1: [64, 8192, 65536], 2: bytes(2)}),
            E.LIMIT_EXCEEDED,
            "spec/tensors.md §3.3: elements checked before data",
        ),
        (
            "tensor with unknown codec",
            packed(STEP, "f16", k3={0: "f8", 1: [1, 2, 4], 2: bytes(8)}),
            E.INVALID_TENSOR,
            "spec/tensors.md §4",
        ),
        (
            "tensor data shorter than its shape",
            packed(STEP, "f16", k3={0: "f16", 1: [1, 2, 4], 2: bytes(15)}),
            E.INVALID_TENSOR,
            "spec/tensors.md §3.3",
        ),
        (
            "tensor map without data key",
            packed(STEP, "f16", k3={0: "f16", 1: [1, 2, 4]}),
            E.INVALID_FIELD,
            "spec/tensors.md §3.3",
        ),
        ("NaN in Step hidden", packed(STEP, "f16", k3=f16([1, 2, 4], H124[:7] + [nan])), E.NON_FINITE, "§7.3"),
        (
            "infinity in StepResult hidden",
            packed(StepResult(session_id=SID, step_id=0, hidden=hidden()), "f16", k2=f16([1, 2, 4], [float("inf")] + H124[1:])),
            E.NON_FINITE,
            "§7.3",
        ),
        (
            "-infinity in Backward grad_outputs",
            packed(BACKWARD, "f32", k5=encode_tensor(t([1, 2, 4], [-float("inf")] + H124[1:], "f32"), Codec.F32)),
            E.NON_FINITE,
            "§7.3",
        ),
        ("NaN in prompts", packed(STEP, "f16", k4=f16([1, 1, 1, 4], [0.0, nan, 0.0, 0.0])), E.NON_FINITE, "§7.3"),
        ("prompts batch differs from hidden", packed(STEP, "f16", k4=f16([8, 2, 1, 4])), E.INVALID_TENSOR, "§5.3 rule 2"),
        ("prompts hidden size differs", packed(STEP, "f16", k4=f16([8, 1, 1, 8])), E.INVALID_TENSOR, "§5.3 rule 2"),
        ("prompts prefix longer than tokens", packed(STEP, "f16", k4=f16([8, 1, 3, 4])), E.INVALID_TENSOR, "§5.3 rule 2"),
        (
            "prompts not covering more than the hops",
            packed(STEP, "f16", k4=f16([16, 1, 1, 4]), k5=[hop_b, HOP_A._encode_body(None)]),
            E.INVALID_TENSOR,
            "§5.3 rule 4",
        ),
        (
            "Forward prompts blocks differ from span",
            packed(FORWARD, "f16", k5=f16([3, 1, 1, 4])),
            E.INVALID_TENSOR,
            "§6.1 prompts blocks",
        ),
        (
            "Backward grad_outputs shape differs",
            packed(BACKWARD, "f16", k5=f16([1, 1, 4])),
            E.INVALID_TENSOR,
            "§6.2 grad_outputs shape",
        ),
        (
            "BackwardResult grad_prompts batch differs",
            packed(BackwardResult(grad_inputs=hidden()), "f16", k1=f16([2, 2, 1, 4])),
            E.INVALID_TENSOR,
            "§6.2 grad_prompts",
        ),
        # --- §8.1 padding mask
        ("mask given an array", packed(STEP_22, "f16", k6=[[0, 1], [1, 1]]), E.INVALID_FIELD, "§8.1 type (bin)"),
        ("mask given a tensor map", packed(STEP_22, "f16", k6=f16([2, 2])), E.INVALID_FIELD, "§8.1 type (bin)"),
        ("mask given str", packed(STEP_22, "f16", k6="0111"), E.INVALID_FIELD, "§8.1 type (bin)"),
        ("empty mask", packed(STEP_22, "f16", k6=b""), E.INVALID_FIELD, "§8.1 length low"),
        # (over MAX_BATCH x MAX_SEQUENCE_LENGTH bytes, LIMIT_EXCEEDED: 8 MiB of hex is too big
        # for this file; tests/test_padding_mask.py checks it)
        ("mask byte 2", packed(STEP_22, "f16", k6=b"\x00\x01\x02\x01"), E.INVALID_FIELD, "§8.1 byte values"),
        ("mask byte 0xff", packed(FORWARD, "f32", k6=b"\x01\xff"), E.INVALID_FIELD, "§8.1 byte values"),
        ("mask shorter than batch x tokens", packed(STEP_22, "f16", k6=b"\x00\x01\x01"), E.INVALID_TENSOR, "§5.3 rule 5, §8.1"),
        ("mask longer than batch x tokens", packed(STEP_22, "f16", k6=bytes([1]) * 5), E.INVALID_TENSOR, "§5.3 rule 5, §8.1"),
        (
            "Forward mask of wrong length",
            packed(FORWARD, "f32", k6=b"\x00\x01\x01"),
            E.INVALID_TENSOR,
            "§6.1 mask, §8.1",
        ),
        ("Backward mask of wrong length", packed(BACKWARD, "f32", k7=b"\x01"), E.INVALID_TENSOR, "§6.2 mask, §8.1"),
        (
            "Push mask of wrong length",
            packed(Push(session_id=SID2, step_id=0, position=0, hidden=hidden()), "f16", k6=b"\x01" * 3),
            E.INVALID_TENSOR,
            "§5.7, §5.3 rule 5",
        ),
        (
            "rule order: prompts (rule 2) before mask (rule 5)",
            packed(STEP_22, "f16", k4=f16([8, 1, 1, 4]), k6=b"\x01"),
            E.INVALID_TENSOR,
            "§5.3 rules in order",
        ),
        (
            "field order: a bad mask byte (key 6, step 7) before position + tokens (step 8)",
            packed(STEP_22, "f16", k2=8191, k6=b"\x07\x01\x01\x01"),
            E.INVALID_FIELD,
            "§2.5 step 7 before step 8",
        ),
        # --- §2.5: the first broken rule wins
        (
            "first field wins: long session id (key 0) and negative position (key 2)",
            packed(STEP, "f16", k0=bytes(65), k2=-1),
            E.LIMIT_EXCEEDED,
            "§2.5 step 7 ascending keys",
        ),
        (
            "field rules before cross-field rules",
            packed(OPEN, k1=8, k4=65),
            E.LIMIT_EXCEEDED,
            "§2.5 step 8 after step 7",
        ),
        (
            "type before body",
            _pack(envelope(99, [])),
            E.UNKNOWN_MESSAGE,
            "§2.5 step 5 before step 6",
        ),
    ]
    del step_body
    return v


# Where a message arrives (spec/messages.md §2.1) -> the types expected there.
PLACES = {"first": FIRST_MESSAGES, "session": SESSION_MESSAGES}
# Rules checked before the type (§2.5 steps 1-5): such a vector has its code anywhere.
_BEFORE_TYPE = ("step 2", "step 3", "step 4", "step 5", "step 6", "§2.2", "§2.4")


def unexpected_vectors(invalid: list[tuple[str, bytes, ErrorCode, str]]) -> list[dict]:
    """Messages sent where their type is not expected: UNKNOWN_MESSAGE whatever the body (§2.1, §2.5 step 5).

    Valid messages in the wrong place, then every ``invalid`` vector whose broken rule is in the
    body, sent where its type is not expected (a Step, SetUpstream, KeepAlive or CloseSession first, any other
    type on a session stream)."""
    cases = [
        ("Step as the first message", encode_message(STEP), "first"),
        ("StepResult (a reply) as the first message", encode_message(StepResult(session_id=SID, step_id=0, hidden=hidden())), "first"),
        ("CloseSession as the first message", encode_message(CloseSession(session_id=SID)), "first"),
        ("OpenSession on a session stream", encode_message(OPEN), "session"),
        ("Push on a session stream", encode_message(Push(session_id=SID, step_id=0, position=0, hidden=hidden())), "session"),
        ("NodeInfoRequest on a session stream", encode_message(NodeInfoRequest()), "session"),
        ("SetUpstream as the first message (§5.10)", encode_message(SetUpstream(session_id=SID, upstream=PEER_A)),
         "first"),
        ("KeepAlive as the first message (§5.9)", encode_message(KeepAlive(session_id=SID)), "first"),
    ]
    session_types = {cls.TYPE for cls in SESSION_MESSAGES}
    for name, data, _code, rule in invalid:
        if not data or any(step in rule for step in _BEFORE_TYPE) or not _passes_structure_scan(data):
            continue
        where = "first" if data[_type_offset(data)] in session_types else "session"
        cases.append((f"{name}, {'as the first message' if where == 'first' else 'on a session stream'}", data, where))
    out = []
    for name, data, where in cases:
        try:
            decode_message(data, PLACES[where])
        except RemoteProtocolError as exc:
            assert exc.code == ErrorCode.UNKNOWN_MESSAGE, (name, exc)
        else:
            raise AssertionError(f"{name} decoded where its type is not expected")
        out.append({"name": name, "where": where, "hex": data.hex(), "error": "UNKNOWN_MESSAGE", "rule": "§2.1, §2.5 step 5"})
    return out


def _passes_structure_scan(data: bytes) -> bool:
    """§2.5 step 2's bounds (1024 entries or str bytes, 4096 objects, depth 16), checked with msgpack-python."""
    import msgpack

    try:
        obj = msgpack.unpackb(data, strict_map_key=False, raw=True, max_str_len=1024, max_array_len=1024, max_map_len=1024)
    except (ValueError, msgpack.ExtraData):
        return False

    def count(o, depth: int) -> int:
        if isinstance(o, (list, dict)) and depth > 16:
            raise ValueError("too deep")
        if isinstance(o, list):
            return 1 + sum(count(x, depth + 1) for x in o)
        if isinstance(o, dict):
            return 1 + sum(count(k, depth + 1) + count(v, depth + 1) for k, v in o.items())
        return 1

    try:
        return count(obj, 1) <= 4096
    except ValueError:
        return False


def _type_offset(data: bytes) -> int:
    """Offset of the type code in a canonical envelope ``83 00 <version> 01 <type>`` (types 1..127)."""
    if data[:4] != bytes([0x83, 0x00, PROTOCOL_VERSION, 0x01]):
        raise AssertionError(f"not a canonical envelope: {data[:8].hex()}")
    return 4


def build() -> dict:
    valid = []
    for name, message, codec in valid_messages():
        data = encode_message(message, codec)
        # The independent writer must agree with the implementation, byte for byte.
        body = body_of(message, codec)
        assert _pack(envelope(message.TYPE, body)) == data, name
        fields = message_to_fields(message, codec)
        assert decode_message(data) == message, name
        valid.append({"name": name, "fields": fields, "hex": data.hex()})
    accepted = accepted_vectors()
    for vector in accepted:
        assert decode_message(bytes.fromhex(vector["hex"])) == fields_to_message(vector["fields"]), vector["name"]
    invalid_list = invalid_vectors()
    invalid = [{"name": n, "hex": d.hex(), "error": e.name, "rule": r} for n, d, e, r in invalid_list]
    return {
        "spec": "spec/messages.md",
        "revision": 1,
        "description": (
            "Node protocol messages (/biopetals/node/2). valid: encode(fields) == hex and "
            "decode(hex) == fields. accepted: non-canonical encodings a receiver MUST decode "
            "to fields. invalid: decode(hex) fails with exactly error. Tensors are "
            "{codec, shape, values}; bytes are hex; all tensors of one vector share one codec."
        ),
        "zstd_version": ".".join(map(str, zstandard.ZSTD_VERSION)),
        "valid": valid,
        "accepted": accepted,
        "invalid": invalid,
        "unexpected": unexpected_vectors(invalid_list),
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
