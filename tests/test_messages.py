"""Unit tests of the node protocol messages (spec/messages.md) beyond the vectors.

Construction-side validation (LocalProtocolError), the canonical encoder, decoder options,
bounded memory on hostile input, error helpers, and sweeps of truncations and byte flips
of every valid vector.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import msgpack
import pytest
import torch

from biopetals.protocol.envelope import PROTOCOL_NAME, PROTOCOL_VERSION, scan_msgpack
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.limits import MAX_ERROR_MESSAGE_BYTES, MAX_FRAME_BYTES, MAX_MESSAGE_OBJECTS, MAX_SEQUENCE_LENGTH
from biopetals.protocol.messages import (
    FIRST_MESSAGES,
    MESSAGE_TYPES,
    REPLY_TO,
    SESSION_MESSAGES,
    CloseSession,
    Error,
    Forward,
    Hop,
    NodeInfo,
    OpenSession,
    SetUpstream,
    KeepAlive,
    Step,
    StepResult,
    decode_message,
    encode_message,
    error_from_exception,
)
from biopetals.protocol.tensors import Codec

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "spec/vectors/messages.json").read_text())
SID = bytes(16)
PEER = str(Identity.from_private_bytes(bytes([1]) * 32).peer_id)
PEER2 = str(Identity.from_private_bytes(bytes([2]) * 32).peer_id)


def hidden(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = shape or (1, 2, 4)
    return (torch.arange(int(torch.tensor(shape).prod())) % 5 - 2).to(dtype).reshape(shape) / 4


def step(**changes) -> Step:
    fields = dict(session_id=SID, step_id=1, position=0, hidden=hidden())
    fields.update(changes)
    return Step(**fields)


def code_of(excinfo: pytest.ExceptionInfo) -> ErrorCode:
    return excinfo.value.code


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        (dict(session_id=b""), ErrorCode.INVALID_FIELD),
        (dict(session_id=bytes(65)), ErrorCode.LIMIT_EXCEEDED),
        (dict(session_id="text"), ErrorCode.INVALID_FIELD),
        (dict(session_id=None), ErrorCode.INVALID_FIELD),
        (dict(step_id=-1), ErrorCode.INVALID_FIELD),
        (dict(step_id=True), ErrorCode.INVALID_FIELD),
        (dict(step_id=1 << 64), ErrorCode.INVALID_FIELD),
        (dict(position=-1), ErrorCode.BAD_POSITION),
        (dict(position=MAX_SEQUENCE_LENGTH - 1), ErrorCode.BAD_POSITION),  # + 2 tokens > MAX_SEQUENCE_LENGTH
        (dict(hidden=hidden(2, 4)), ErrorCode.INVALID_TENSOR),
        (dict(hidden=torch.ones((1, 2, 4), dtype=torch.int64)), ErrorCode.INVALID_TENSOR),
        (dict(hidden=[[[1.0]]]), ErrorCode.INVALID_TENSOR),
        (dict(hidden=hidden(65, 1, 1)), ErrorCode.LIMIT_EXCEEDED),
        (dict(hidden=torch.full((1, 2, 4), float("nan"))), ErrorCode.NON_FINITE),
        (dict(prompts=hidden(1, 2, 1, 4)), ErrorCode.INVALID_TENSOR),  # batch 2 != 1
        (dict(prompts=hidden(1, 1, 3, 4)), ErrorCode.INVALID_TENSOR),  # prefix 3 > 2 tokens
        (dict(next=[Hop(peer_id=PEER, session_id=b"s", start=1, end=2), "x"]), ErrorCode.INVALID_FIELD),
        (
            dict(next=[Hop(peer_id=PEER, session_id=b"s", start=1, end=2), Hop(peer_id=PEER2, session_id=b"s", start=3, end=4)]),
            ErrorCode.INVALID_FIELD,
        ),
    ],
)
def test_constructing_an_invalid_step_raises_local_error(changes: dict, code: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as info:
        step(**changes)
    assert code_of(info) == code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_whose_sum_overflows_are_accepted(dtype: torch.dtype) -> None:
    """The finiteness check sums in float32 first; an overflowing sum must not reject finite data."""
    big = torch.full((1, 2, 4), torch.finfo(dtype).max, dtype=dtype)
    message = step(hidden=big)
    assert decode_message(encode_message(message)) == message
    bad = big.clone()
    bad[0, 1, 3] = float("nan")
    with pytest.raises(LocalProtocolError) as info:
        step(hidden=bad)
    assert code_of(info) == ErrorCode.NON_FINITE
    signed = torch.tensor([[[float("inf"), -float("inf")]]], dtype=dtype)  # sum is NaN
    with pytest.raises(LocalProtocolError):
        step(hidden=signed)


def test_construction_normalises_values() -> None:
    hop = Hop(peer_id=PEER, session_id=bytearray(b"s"), start=1, end=2, addrs=["/ip4/1.2.3.4/tcp/1"])
    assert hop.session_id == b"s" and type(hop.session_id) is bytes
    assert hop.peer_id == PeerId.from_base58(PEER)
    assert [str(addr) for addr in hop.addrs] == ["/ip4/1.2.3.4/tcp/1"]
    assert Hop(peer_id=PEER, session_id=b"s", start=1, end=2).addrs == ()
    s = step(next=[hop])
    assert s.next == (hop,) and s.tokens == 2 and s.prompts is None
    assert step(next=None).next == ()
    opened = OpenSession(model="m", start=0, end=1, max_length=1, batch_size=1, codec="f16+zstd")
    assert opened.codec is Codec.F16_ZSTD and opened.session_id is None
    info = NodeInfo(
        version="v", model="m", start=0, end=1, dtype="float32", quant="none", hidden_size=8,
        cache_tokens_left=0, inference_tps=5, forward_tps=0,
    )
    assert type(info.inference_tps) is float and info.inference_tps == 5.0


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: OpenSession(model="m", start=2, end=2, max_length=8, batch_size=1, codec="f16"), ErrorCode.INVALID_FIELD),
        (lambda: OpenSession(model="m", start=0, end=2, max_length=8, batch_size=1, codec="f8"), ErrorCode.DTYPE_MISMATCH),
        (lambda: OpenSession(model="m", start=0, end=2, max_length=0, batch_size=1, codec="f16"), ErrorCode.INVALID_FIELD),
        (lambda: OpenSession(model="", start=0, end=2, max_length=8, batch_size=1, codec="f16"), ErrorCode.INVALID_FIELD),
        (lambda: OpenSession(model="m" * 257, start=0, end=2, max_length=8, batch_size=1, codec="f16"), ErrorCode.LIMIT_EXCEEDED),
        (lambda: Forward(model="m", start=0, end=2, codec="f16", hidden=hidden(), prompts=hidden(3, 1, 1, 4)), ErrorCode.INVALID_TENSOR),
        (lambda: Error(code=0, message=""), ErrorCode.INVALID_FIELD),
        (lambda: Error(code=ErrorCode.BUSY, message="\ud800"), ErrorCode.INVALID_FIELD),  # lone surrogate
        (lambda: Hop(peer_id=PEER, session_id=b"s", start=3, end=3), ErrorCode.INVALID_FIELD),
        (lambda: Hop(peer_id="p", session_id=b"s", start=3, end=4), ErrorCode.INVALID_FIELD),
        (lambda: Hop(peer_id=PEER, session_id=b"s", start=3, end=4, addrs=["10.0.0.1:80"]), ErrorCode.INVALID_FIELD),
        (
            lambda: Hop(peer_id=PEER, session_id=b"s", start=3, end=4, addrs=[f"/ip4/10.0.0.1/tcp/1/p2p/{PEER2}"]),
            ErrorCode.INVALID_FIELD,
        ),
    ],
)
def test_constructing_other_invalid_messages(build, code: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as info:
        build()
    assert code_of(info) == code


def test_error_codes_known_and_unknown() -> None:
    assert Error(code=19, message="").code is ErrorCode.BAD_POSITION
    newer = decode_message(encode_message(Error(code=999, message="x")))
    assert newer.code == 999 and not isinstance(newer.code, ErrorCode)
    exc = Error(code=ErrorCode.UNKNOWN_SESSION, message="gone", step_id=3).to_exception()
    assert isinstance(exc, RemoteProtocolError) and exc.code is ErrorCode.UNKNOWN_SESSION


def test_error_from_exception_truncates_at_a_character_boundary() -> None:
    exc = RemoteProtocolError(ErrorCode.INVALID_FIELD, "é" * 1000)  # 2000 bytes of UTF-8
    error = error_from_exception(exc, step_id=4)
    assert error.code is ErrorCode.INVALID_FIELD and error.step_id == 4
    assert len(error.message.encode()) == MAX_ERROR_MESSAGE_BYTES and error.message == "é" * 512
    assert decode_message(encode_message(error)) == error


# ----------------------------------------------------------------------------- encoding


def test_protocol_name() -> None:
    assert PROTOCOL_NAME == "/biopetals/node/2" and PROTOCOL_VERSION == 2  # §5.10: version 2


def test_encoding_is_canonical_whatever_the_attribute_order() -> None:
    # Forward declares hidden (key 4) before codec (key 3); the body is in key order.
    message = Forward(model="m", start=0, end=2, hidden=hidden(), codec=Codec.F16)
    envelope = msgpack.unpackb(encode_message(message), strict_map_key=False)
    assert list(envelope) == [0, 1, 2]
    assert list(envelope[2]) == [0, 1, 2, 3, 4]  # prompts (5) absent: omitted
    assert list(envelope[2][4]) == [0, 1, 2]


def test_codec_argument_selects_the_tensor_codec() -> None:
    message = step(hidden=torch.tensor([[[1.0 / 3.0, 2.0]]]))
    lossless = decode_message(encode_message(message))
    assert lossless.hidden.dtype == torch.float32 and torch.equal(lossless.hidden, message.hidden)
    for codec, dtype in [(Codec.F16, torch.float16), (Codec.F16_ZSTD, torch.float16), ("bf16", torch.bfloat16)]:
        decoded = decode_message(encode_message(message, codec))
        assert decoded.hidden.dtype == dtype
        assert torch.equal(decoded.hidden, message.hidden.to(dtype))
    with pytest.raises(LocalProtocolError) as info:
        encode_message(message, "f8")
    assert code_of(info) == ErrorCode.DTYPE_MISMATCH


def test_encoding_a_value_that_overflows_the_codec_is_refused() -> None:
    message = step(hidden=torch.tensor([[[70000.0, 1.0]]]))  # finite in f32, inf in f16
    with pytest.raises(LocalProtocolError) as info:
        encode_message(message, Codec.F16)
    assert code_of(info) == ErrorCode.NON_FINITE


def test_encode_rejects_non_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(Hop(peer_id=PEER, session_id=b"s", start=1, end=2))  # a Hop is not a message
    with pytest.raises(LocalProtocolError):
        encode_message({"type": 7})  # type: ignore[arg-type]


def test_equality() -> None:
    assert step() == step()
    assert step() != step(step_id=2)
    assert step() != step(hidden=hidden(dtype=torch.float16))  # same values, other dtype
    assert step() != CloseSession(session_id=SID)
    with pytest.raises(TypeError):
        hash(step())


# ----------------------------------------------------------------------------- decoding


def test_expected_types_restrict_what_decodes() -> None:
    result = encode_message(StepResult(session_id=SID, step_id=1, hidden=hidden()))
    assert isinstance(decode_message(result, (StepResult,)), StepResult)
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(result, (Step, CloseSession))
    assert code_of(info) == ErrorCode.UNKNOWN_MESSAGE


def test_stream_roles_cover_every_message_once() -> None:
    requests = set(FIRST_MESSAGES) | set(SESSION_MESSAGES)
    assert requests - {SetUpstream, KeepAlive} == set(REPLY_TO)  # no reply to these (§5.10, §5.9)
    replies = set(REPLY_TO.values()) | {Error}
    assert requests | replies == set(MESSAGE_TYPES.values()) and not requests & replies
    step_data = encode_message(step())
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(step_data, FIRST_MESSAGES)  # a Step cannot open a stream (§2.1)
    assert code_of(info) == ErrorCode.UNKNOWN_MESSAGE


def test_decode_rejects_non_bytes_as_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        decode_message("83000101")  # type: ignore[arg-type]


def test_decoded_tensors_are_writable_and_do_not_alias_the_input() -> None:
    data = bytearray(encode_message(step(), Codec.F16))
    decoded = decode_message(data)
    before = decoded.hidden.clone()
    data[-1] ^= 0xFF  # change the last byte of the tensor data after decoding
    assert torch.equal(decoded.hidden, before)
    decoded.hidden.add_(1)


def test_unknown_keys_are_ignored_and_not_re_encoded() -> None:
    body = {0: SID, 1: 5, 42: {7: [1, 2]}}
    data = msgpack.packb({0: PROTOCOL_VERSION, 1: 10, 2: body, 9: "future"}, use_bin_type=True)
    decoded = decode_message(data)
    assert encode_message(decoded) == msgpack.packb({0: PROTOCOL_VERSION, 1: 10, 2: {0: SID, 1: 5}}, use_bin_type=True)


def test_oversized_payload_is_refused_before_parsing() -> None:
    data = memoryview(bytes(MAX_FRAME_BYTES + 1))
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data)
    assert code_of(info) == ErrorCode.LIMIT_EXCEEDED


def _peak_bytes(data: bytes) -> tuple[int, ErrorCode]:
    tracemalloc.start()
    try:
        try:
            decode_message(data)
        except RemoteProtocolError as exc:
            code = exc.code
        return tracemalloc.get_traced_memory()[1], code
    finally:
        tracemalloc.stop()


def test_many_small_objects_are_refused_before_msgpack_builds_them() -> None:
    """1 MB of empty arrays would be 10**6 Python lists (~60 MB); the scan stops at 4096 objects."""
    inner = b"\xdc\x03\xe8" + b"\x90" * 1000  # array of 1000 empty arrays
    data = b"\x83\x00\x02\x01\x07\x02\x82\x00\xc4\x01s\x09\xdc\x03\xe8" + inner * 1000
    assert len(data) > 10**6
    peak, code = _peak_bytes(data)
    assert code == ErrorCode.LIMIT_EXCEEDED
    assert peak < 1 * 2**20, f"peak {peak} bytes"


def test_declared_sizes_are_checked_before_allocating() -> None:
    # A tensor declaring 2**24 elements (32 MiB of f16) with 2 bytes of data.
    data = msgpack.packb(
        {0: PROTOCOL_VERSION, 1: 5, 2: {0: SID, 1: 0, 2: 0, 3: {0: "f16", 1: [1, 4096, 4096], 2: b"\x00\x00"}}}, use_bin_type=True
    )
    peak, code = _peak_bytes(data)
    assert code == ErrorCode.INVALID_TENSOR
    assert peak < 1 * 2**20, f"peak {peak} bytes"


def test_scan_counts_objects() -> None:
    assert scan_msgpack(b"\xc0") == 1
    assert scan_msgpack(msgpack.packb({0: [1, 2, b"x"], 1: "s"})) == 1 + 2 + 4 + 1  # map, keys, array + items, "s"
    with pytest.raises(RemoteProtocolError):
        scan_msgpack(msgpack.packb([None] * 10), max_objects=10)
    scan_msgpack(msgpack.packb([None] * 9), max_objects=10)
    assert MAX_MESSAGE_OBJECTS == 4096


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_every_truncation_is_malformed(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    for end in range(len(data)):
        with pytest.raises(RemoteProtocolError) as info:
            decode_message(data[:end])
        assert code_of(info) == ErrorCode.MALFORMED, end


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_every_byte_flip_decodes_or_raises_remote_error(vector: dict) -> None:
    data = bytes.fromhex(vector["hex"])
    for index in range(min(len(data), 160)):  # headers and fields; tensor data is all alike
        for mask in (0x01, 0x80, 0xFF):
            mutated = bytearray(data)
            mutated[index] ^= mask
            try:
                message = decode_message(bytes(mutated))
            except RemoteProtocolError:
                continue
            assert decode_message(encode_message(message)) == message
