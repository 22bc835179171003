"""Tests of the tensor codec (spec/tensors.md §3-§4) beyond the vectors: round trips,
conversions against torch's own, limits, aliasing, and the receiver's leniency towards
valid-but-non-canonical msgpack."""

from __future__ import annotations

import struct

import hypothesis.extra.numpy as hnp
import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_FRAME_BYTES, MAX_TENSOR_DIMS, MAX_TENSOR_ELEMENTS
from biopetals.protocol.tensors import (
    DEFAULT_CODEC,
    Codec,
    decode_tensor,
    encode_tensor,
    pack_tensor,
    require_finite,
    unpack_tensor,
)

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def arrays(dtype: str, **floats):
    return hnp.arrays(np.dtype(dtype), shapes, elements=st.floats(width=int(dtype[1:]) * 8, **floats))


# ---------------------------------------------------------------- round trips (Hypothesis)


@settings(max_examples=60, deadline=None)
@given(arrays("f4"))
def test_f32_round_trip_is_bit_exact(array):
    x = torch.from_numpy(array)
    y = unpack_tensor(pack_tensor(x, Codec.F32))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))  # NaN payloads and negative zero included


@settings(max_examples=60, deadline=None)
@given(arrays("f2"), st.sampled_from([Codec.F16, Codec.F16_ZSTD]), st.integers(-1, 6))
def test_f16_round_trip_of_fp16_values_is_bit_exact(array, codec, level):
    x = torch.from_numpy(array)
    y = unpack_tensor(pack_tensor(x, codec, zstd_level=level))
    assert y.dtype == torch.float16 and y.shape == x.shape
    assert torch.equal(bits(y), bits(x))


@settings(max_examples=60, deadline=None)
@given(arrays("f4", allow_nan=False, min_value=-65504.0, max_value=65504.0))
def test_f16_from_fp32_equals_torch_half(array):
    x = torch.from_numpy(array)
    for codec in (Codec.F16, Codec.F16_ZSTD):
        assert torch.equal(bits(unpack_tensor(pack_tensor(x, codec))), bits(x.half()))


@settings(max_examples=60, deadline=None)
@given(arrays("f4", allow_nan=False, allow_infinity=False, max_value=2.0**127, min_value=-(2.0**127)))
def test_bf16_from_fp32_equals_torch_bfloat16_and_round_trips(array):
    x = torch.from_numpy(array)
    y = unpack_tensor(pack_tensor(x, Codec.BF16))
    assert y.dtype == torch.bfloat16
    assert torch.equal(bits(y), bits(x.to(torch.bfloat16)))
    # and bf16 values themselves survive exactly
    assert torch.equal(bits(unpack_tensor(pack_tensor(y, Codec.BF16))), bits(y))


@settings(max_examples=40, deadline=None)
@given(arrays("f2", allow_nan=False))  # NaN payload bits are not values; f16 itself keeps them
def test_f32_is_lossless_for_fp16_values(array):
    x = torch.from_numpy(array)
    y = unpack_tensor(pack_tensor(x, Codec.F32))
    assert torch.equal(bits(y.half()), bits(x))


def test_realistic_activation_through_every_codec():
    torch.manual_seed(0)
    x = torch.randn(2, 256, 576) * 30
    for codec in Codec:
        y = unpack_tensor(pack_tensor(x, codec))
        assert y.shape == x.shape
        tolerance = {Codec.F32: 0, Codec.BF16: 2**-8, Codec.F16: 2**-11, Codec.F16_ZSTD: 2**-11}[codec]
        assert ((y.float() - x).abs() <= x.abs() * tolerance + 2**-24).all()


def test_default_codec_is_raw_fp16():
    # Chosen from benchmarks/bench_tensor_codec.py; see spec/tensors.md §5.
    assert DEFAULT_CODEC is Codec.F16
    assert encode_tensor(torch.ones(2))[0] == "f16"


# ---------------------------------------------------------------- encoder rules


def test_encoder_writes_the_documented_map():
    wire = encode_tensor(torch.tensor([[1.0, -2.0]]), Codec.F16)
    assert wire == {0: "f16", 1: [1, 2], 2: bytes.fromhex("003c00c0")}
    # the byte table of spec/tensors.md §3.1
    assert pack_tensor(torch.tensor([[1.0, -2.0]]), Codec.F16) == bytes.fromhex("83 00 a3663136 01 920102 02 c404 003c00c0")


@pytest.mark.parametrize("value", [65520.0, -70000.0, 1e10])
def test_f16_overflow_is_a_local_error_not_inf(value):
    with pytest.raises(LocalProtocolError) as info:
        encode_tensor(torch.tensor([1.0, value]), Codec.F16)
    assert info.value.code == ErrorCode.NON_FINITE
    with pytest.raises(LocalProtocolError):
        encode_tensor(torch.tensor([value]), Codec.F16_ZSTD)


def test_largest_values_that_round_into_fp16_range_are_accepted():
    y = unpack_tensor(pack_tensor(torch.tensor([65504.0, 65519.0, -65519.99]), Codec.F16))
    assert y.tolist() == [65504.0, 65504.0, -65504.0]


def test_bf16_overflow_from_float64_is_a_local_error():
    with pytest.raises(LocalProtocolError):
        encode_tensor(torch.tensor([1e39], dtype=torch.float64), Codec.BF16)
    with pytest.raises(LocalProtocolError):
        encode_tensor(torch.tensor([1e39], dtype=torch.float64), Codec.F32)


def test_existing_non_finite_values_are_carried_not_rejected():
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 70000.0])
    y = unpack_tensor(pack_tensor(x, Codec.BF16))
    assert y[0] == float("inf") and y[1] == float("-inf") and y[2].isnan()
    with pytest.raises(LocalProtocolError):  # ...but a finite overflow next to them is still caught
        encode_tensor(x, Codec.F16)


def test_encoder_accepts_views_grad_and_float64():
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6).requires_grad_()
    view = base.t()[1:4]  # non-contiguous
    y = unpack_tensor(pack_tensor(view, Codec.F32))
    assert torch.equal(y, view.detach().float())


@pytest.mark.parametrize(
    ("tensor", "codec", "code"),
    [
        (torch.ones(2, dtype=torch.int64), Codec.F16, ErrorCode.INVALID_TENSOR),
        (torch.ones(2, dtype=torch.bool), Codec.F32, ErrorCode.INVALID_TENSOR),
        (torch.ones([1] * (MAX_TENSOR_DIMS + 1)), Codec.F16, ErrorCode.LIMIT_EXCEEDED),
        (torch.zeros(1).expand(MAX_TENSOR_ELEMENTS + 1), Codec.F16, ErrorCode.LIMIT_EXCEEDED),
        (torch.empty(4096, 4097, 0), Codec.F16, ErrorCode.LIMIT_EXCEEDED),
        (torch.ones(2), "f64", ErrorCode.INVALID_TENSOR),
    ],
)
def test_encoder_refuses_what_a_receiver_would_reject(tensor, codec, code):
    with pytest.raises(LocalProtocolError) as info:
        encode_tensor(tensor, codec)
    assert info.value.code == code


@pytest.mark.parametrize("level", [23, -8, 1.5, "3", True])
def test_bad_zstd_level_is_a_local_error(level):
    with pytest.raises(LocalProtocolError):
        encode_tensor(torch.ones(2), Codec.F16_ZSTD, zstd_level=level)


def test_encode_rejects_non_tensors():
    with pytest.raises(LocalProtocolError):
        encode_tensor([1.0, 2.0])  # type: ignore[arg-type]


def test_zstd_frame_declares_content_size_and_has_no_checksum():
    data = encode_tensor(torch.ones(3, 5), Codec.F16_ZSTD)[2]
    params = zstandard.get_frame_parameters(data)
    assert params.content_size == 30
    assert not params.has_checksum and params.dict_id == 0


# ---------------------------------------------------------------- decoder behaviour


def test_decoded_tensor_is_writable_and_owns_its_memory():
    payload = bytearray(pack_tensor(torch.tensor([1.0, 2.0, 3.0]), Codec.F16))
    y = unpack_tensor(payload)
    y.add_(1)  # in-place op on the decoded tensor works
    payload[-2:] = b"\x00\x00"  # and mutating the source buffer does not reach it
    assert y.tolist() == [2.0, 3.0, 4.0]
    z = unpack_tensor(bytes(payload))
    assert z.tolist() == [1.0, 2.0, 0.0]


@pytest.mark.parametrize("codec", list(Codec))
def test_decode_twice_gives_independent_tensors(codec):
    wire = encode_tensor(torch.tensor([1.0, 2.0]), codec)
    a, b = decode_tensor(wire), decode_tensor(wire)
    a.mul_(0)
    assert b.tolist() == [1.0, 2.0]


def test_empty_and_scalar_tensors():
    for codec in Codec:
        empty = unpack_tensor(pack_tensor(torch.empty(0, 4096), codec))
        assert empty.shape == (0, 4096)
        scalar = unpack_tensor(pack_tensor(torch.tensor(2.5), codec))
        assert scalar.shape == () and float(scalar) == 2.5


def _raw_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def test_receiver_accepts_non_canonical_msgpack():
    """spec/tensors.md §3.2: any valid msgpack encoding of a valid map is accepted."""
    data = struct.pack("<ee", 1.0, -2.0)
    codec = b"\xd9\x03f16"  # str 8 instead of fixstr
    shape = b"\xdc\x00\x02" + b"\xcd\x00\x01" + b"\xd3" + (2).to_bytes(8, "big")  # array16, uint16, int64
    blob = b"\xc6" + len(data).to_bytes(4, "big") + data  # bin32
    reordered = _raw_map([(b"\x02", blob), (b"\xcc\x00", codec), (b"\x01", shape)])  # key 0 as uint8
    assert unpack_tensor(reordered).tolist() == [[1.0, -2.0]]


def test_receiver_accepts_a_zstd_frame_with_checksum():
    raw = struct.pack("<4e", 1.0, 2.0, 3.0, 4.0)
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(raw)
    y = decode_tensor({0: "f16+zstd", 1: [2, 2], 2: frame})
    assert y.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_receiver_accepts_a_multi_block_zstd_frame_at_the_element_limit_edge():
    x = torch.randn(3, 70_000).half()  # 420 kB: more than one 128 KiB zstd block
    y = unpack_tensor(pack_tensor(x, Codec.F16_ZSTD, zstd_level=3), max_elements=x.numel())
    assert torch.equal(bits(y), bits(x))


def test_receiver_limit_can_be_tighter():
    wire = encode_tensor(torch.ones(10))
    assert decode_tensor(wire, max_elements=10).shape == (10,)
    with pytest.raises(RemoteProtocolError) as info:
        decode_tensor(wire, max_elements=9)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    with pytest.raises(LocalProtocolError):
        decode_tensor(wire, max_elements=MAX_TENSOR_ELEMENTS + 1)


def test_zstd_bomb_is_refused_before_decompressing():
    # A 1 MiB run of zeros compresses to a few dozen bytes; the declared shape
    # (2**24 + 1 elements) is rejected before zstd is called.
    frame = zstandard.ZstdCompressor().compress(bytes(1 << 20))
    with pytest.raises(RemoteProtocolError) as info:
        decode_tensor({0: "f16+zstd", 1: [MAX_TENSOR_ELEMENTS + 1], 2: frame})
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    # ...and a matching shape that the receiver's tighter limit refuses, likewise.
    with pytest.raises(RemoteProtocolError) as info:
        decode_tensor({0: "f16+zstd", 1: [1 << 19], 2: frame}, max_elements=1 << 18)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_standalone_input_over_the_frame_limit():
    with pytest.raises(RemoteProtocolError) as info:
        unpack_tensor(bytes(MAX_FRAME_BYTES + 1))  # calloc'd: no pages touched
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_huge_msgpack_containers_are_refused_up_front():
    long_codec = msgpack.packb({0: "x" * 5000, 1: [1], 2: b"\x00\x00"})
    with pytest.raises(RemoteProtocolError) as info:
        unpack_tensor(long_codec)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    # Embedded in a message the same map is simply an unknown codec.
    with pytest.raises(RemoteProtocolError) as info:
        decode_tensor(msgpack.unpackb(long_codec, strict_map_key=False))
    assert info.value.code == ErrorCode.INVALID_TENSOR


def test_decoder_accepts_tuple_shapes_from_use_list_false():
    obj = msgpack.unpackb(pack_tensor(torch.ones(2, 3)), strict_map_key=False, use_list=False)
    assert decode_tensor(obj).shape == (2, 3)


def test_require_finite():
    require_finite(torch.ones(3))
    require_finite(torch.empty(0))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RemoteProtocolError) as info:
            require_finite(torch.tensor([1.0, bad]).half(), "hidden states")
        assert info.value.code == ErrorCode.NON_FINITE
