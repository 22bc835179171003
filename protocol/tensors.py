"""The tensor codec: torch tensors to and from the wire map of spec/tensors.md.

A tensor travels as a msgpack map ``{0: codec, 1: shape, 2: data}`` (spec/tensors.md
§3). ``encode_tensor``/``decode_tensor`` convert between a tensor and that map (the
message codecs embed it in their own maps); ``pack_tensor``/``unpack_tensor`` are the
standalone msgpack form used by test vectors and fuzzing.

The decoder validates in the order of spec/tensors.md §3.3 and checks every declared
size against the limits *before* allocating or decompressing anything. On bad input
it raises only ``RemoteProtocolError``.
"""

from __future__ import annotations

import math
from typing import Final

import msgpack
import numpy as np
import torch
import zstandard

from biopetals.protocol.codec_names import Codec
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import (
    MAX_FRAME_BYTES,
    MAX_MSGPACK_CONTAINER,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
)

__all__ = [
    "Codec",
    "DEFAULT_CODEC",
    "DEFAULT_ZSTD_LEVEL",
    "KEY_CODEC",
    "KEY_SHAPE",
    "KEY_DATA",
    "encode_tensor",
    "decode_tensor",
    "pack_tensor",
    "unpack_tensor",
    "require_finite",
]


#: Wire-map keys (spec/tensors.md §3.1).
KEY_CODEC: Final = 0
KEY_SHAPE: Final = 1
KEY_DATA: Final = 2
_KEYS: Final = frozenset((KEY_CODEC, KEY_SHAPE, KEY_DATA))

#: Raw fp16 by default: on real activations zstd saves only a few percent of the
#: bytes at a large cost in speed (benchmarks/bench_tensor_codec.py, spec/tensors.md §5).
DEFAULT_CODEC: Final = Codec.F16
#: Level used for f16+zstd when the caller names none (spec/tensors.md §4.4).
DEFAULT_ZSTD_LEVEL: Final = 1
_MIN_ZSTD_LEVEL: Final = -7
_MAX_ZSTD_LEVEL: Final = 22

# Per codec: the dtype decode returns, and the little-endian integer view of its bits.
_TORCH_DTYPE: Final = {
    Codec.F32: torch.float32,
    Codec.BF16: torch.bfloat16,
    Codec.F16: torch.float16,
    Codec.F16_ZSTD: torch.float16,
}
_BITS_VIEW: Final = {
    torch.float32: (torch.int32, np.dtype("<i4")),
    torch.bfloat16: (torch.int16, np.dtype("<i2")),
    torch.float16: (torch.int16, np.dtype("<i2")),
}
_ENCODABLE_DTYPES: Final = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- encode


def encode_tensor(
    tensor: torch.Tensor,
    codec: Codec | str = DEFAULT_CODEC,
    *,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
) -> dict[int, object]:
    """Return the msgpack-ready wire map of ``tensor`` (spec/tensors.md §3).

    The tensor is converted to the codec's element type with round-to-nearest-even
    (torch's own conversion). A finite value that would overflow to infinity (for
    instance 70000.0 as f16) raises ``LocalProtocolError(NON_FINITE)`` instead of
    silently sending inf (spec/tensors.md §4.3). NaN and infinities already present
    are carried unchanged.
    """
    codec = _local_codec(codec)
    if not isinstance(tensor, torch.Tensor):
        raise LocalProtocolError(ErrorCode.INVALID_TENSOR, f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _ENCODABLE_DTYPES:
        raise LocalProtocolError(ErrorCode.INVALID_TENSOR, f"cannot encode dtype {tensor.dtype}; floating point only")
    if tensor.dim() > MAX_TENSOR_DIMS:
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"{tensor.dim()} dimensions > MAX_TENSOR_DIMS {MAX_TENSOR_DIMS}"
        )
    if math.prod(dim or 1 for dim in tensor.shape) > MAX_TENSOR_ELEMENTS:  # §3.3 step 4, zeros left out
        raise LocalProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"shape {list(tensor.shape)} is over MAX_TENSOR_ELEMENTS {MAX_TENSOR_ELEMENTS}"
        )
    if codec is Codec.F16_ZSTD and not (
        type(zstd_level) is int and _MIN_ZSTD_LEVEL <= zstd_level <= _MAX_ZSTD_LEVEL
    ):
        raise LocalProtocolError(
            ErrorCode.INVALID_FIELD, f"zstd level {zstd_level!r} not in [{_MIN_ZSTD_LEVEL}, {_MAX_ZSTD_LEVEL}]"
        )

    source = tensor.detach()
    dtype = _TORCH_DTYPE[codec]
    converted = source.to(dtype)  # on the tensor's own device: less to copy off a GPU
    if _narrows(source.dtype, dtype) and converted.numel():
        _check_no_overflow(source, converted, codec)
    data = _to_le_bytes(converted.cpu().contiguous())
    if codec is Codec.F16_ZSTD:
        compressor = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=False)
        data = compressor.compress(data)
    return {KEY_CODEC: codec.value, KEY_SHAPE: list(converted.shape), KEY_DATA: data}


def pack_tensor(
    tensor: torch.Tensor,
    codec: Codec | str = DEFAULT_CODEC,
    *,
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
) -> bytes:
    """Return the standalone msgpack bytes of ``tensor``'s wire map (spec/tensors.md §3.2)."""
    return msgpack.packb(encode_tensor(tensor, codec, zstd_level=zstd_level), use_bin_type=True)


def _local_codec(codec: Codec | str) -> Codec:
    try:
        return Codec(codec)
    except ValueError:
        raise LocalProtocolError(ErrorCode.INVALID_TENSOR, f"unknown codec {codec!r}") from None


def _narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """True when ``target`` has a smaller finite range than ``source``."""
    return torch.finfo(target).max < torch.finfo(source).max


def _check_no_overflow(source: torch.Tensor, converted: torch.Tensor, codec: Codec) -> None:
    """Raise if a finite source value became infinite in ``converted`` (spec/tensors.md §4.3)."""
    # One cheap reduction in the common case; the exact, slower check only when the
    # extremes are not finite (an overflow, or inf/NaN the caller already had).
    low, high = torch.aminmax(converted)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    overflowed = torch.isinf(converted) & torch.isfinite(source)
    if bool(overflowed.any()):
        index = tuple(int(i) for i in overflowed.nonzero()[0])
        raise LocalProtocolError(
            ErrorCode.NON_FINITE,
            f"value {float(source[index])!r} at {list(index)} is outside the range of {codec.value}",
        )


def _to_le_bytes(tensor: torch.Tensor) -> bytes:
    int_dtype, le_dtype = _BITS_VIEW[tensor.dtype]
    # astype is a no-op on little-endian hosts and a byte swap elsewhere.
    return tensor.view(int_dtype).numpy().astype(le_dtype, copy=False).tobytes()


# ----------------------------------------------------------------------------- decode


def decode_tensor(obj: object, *, max_elements: int = MAX_TENSOR_ELEMENTS) -> torch.Tensor:
    """Decode a wire map (as msgpack decoded it) into a new, writable tensor.

    Returns float32, bfloat16 or float16 according to the codec; the caller converts
    to its own dtype. Raises ``RemoteProtocolError`` on anything that breaks
    spec/tensors.md §3-§4, checking in the order of §3.3. ``max_elements`` lets a
    receiver enforce a tighter limit than ``MAX_TENSOR_ELEMENTS``.
    """
    if not (isinstance(max_elements, int) and 0 <= max_elements <= MAX_TENSOR_ELEMENTS):
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"max_elements must be in [0, {MAX_TENSOR_ELEMENTS}]")

    # §3.3 step 1-2: a map with exactly the three integer keys.
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"tensor must be a map, got {_kind(obj)}")
    # type() is not int, not isinstance: True == 1 and 1.0 == 1 would otherwise pass as keys.
    if len(obj) != len(_KEYS) or any(type(key) is not int for key in obj) or set(obj) != _KEYS:
        raise RemoteProtocolError(
            ErrorCode.INVALID_FIELD, f"tensor map must have exactly the keys 0, 1, 2; got {_describe_keys(obj)}"
        )
    raw_codec, shape, data = obj[KEY_CODEC], obj[KEY_SHAPE], obj[KEY_DATA]

    # step 3: codec.
    if not isinstance(raw_codec, str):
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"tensor codec must be a string, got {_kind(raw_codec)}")
    try:
        codec = Codec(raw_codec)
    except ValueError:
        raise RemoteProtocolError(ErrorCode.INVALID_TENSOR, f"unknown tensor codec {raw_codec[:40]!r}") from None

    # step 4: shape, and the element count against the limit.
    count = _check_shape(shape, max_elements)

    # step 5: data.
    if not isinstance(data, (bytes, bytearray)):
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"tensor data must be binary, got {_kind(data)}")
    dtype = _TORCH_DTYPE[codec]
    int_dtype, le_dtype = _BITS_VIEW[dtype]
    expected = count * le_dtype.itemsize

    # step 6: sizes, then (zstd) decompression bounded by the size already checked.
    if codec is Codec.F16_ZSTD:
        data = _decompress(data, expected)
    elif len(data) != expected:
        raise RemoteProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"{codec.value} tensor of shape {list(shape)} needs {expected} data bytes, got {len(data)}",
        )

    if count == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    # A fresh native-order array: writable and aliasing nothing the caller still holds.
    bits = np.frombuffer(data, dtype=le_dtype, count=count).astype(le_dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(bits).view(dtype).reshape(tuple(shape))


def unpack_tensor(data: bytes, *, max_elements: int = MAX_TENSOR_ELEMENTS) -> torch.Tensor:
    """Decode standalone msgpack bytes holding exactly one wire map (spec/tensors.md §3.2)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.MALFORMED, f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_FRAME_BYTES:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{len(data)} bytes > MAX_FRAME_BYTES {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,  # the wire map's keys are integers
            # Bounds far above any valid tensor (§3.2) so that hostile containers
            # cost nothing; valid-but-wrong structure is classified by decode_tensor.
            max_bin_len=MAX_FRAME_BYTES,
            max_str_len=MAX_MSGPACK_CONTAINER,
            max_array_len=MAX_MSGPACK_CONTAINER,
            max_map_len=MAX_MSGPACK_CONTAINER,
            max_ext_len=MAX_MSGPACK_CONTAINER,
        )
    except msgpack.ExtraData:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "trailing bytes after the tensor map") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers truncated input, invalid UTF-8, bad map keys and the
        # size limits above (which msgpack reports as "... exceeds max_...").
        code = ErrorCode.LIMIT_EXCEEDED if "exceeds max_" in str(exc) else ErrorCode.MALFORMED
        raise RemoteProtocolError(code, f"tensor is not valid msgpack: {exc}") from None
    return decode_tensor(obj, max_elements=max_elements)


def require_finite(tensor: torch.Tensor, what: str = "tensor") -> None:
    """Raise ``RemoteProtocolError(NON_FINITE)`` if a decoded tensor holds NaN or inf.

    The codecs carry any bit pattern (spec/tensors.md §4); messages whose spec forbids
    non-finite values call this after decoding.
    """
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        raise RemoteProtocolError(ErrorCode.NON_FINITE, f"{what} contains NaN or infinity")


def _check_shape(shape: object, max_elements: int) -> int:
    """Validate a declared shape (spec/tensors.md §3.1) and return its element count."""
    if not isinstance(shape, (list, tuple)):
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"tensor shape must be an array, got {_kind(shape)}")
    if len(shape) > MAX_TENSOR_DIMS:
        raise RemoteProtocolError(
            ErrorCode.LIMIT_EXCEEDED, f"tensor has {len(shape)} dimensions > MAX_TENSOR_DIMS {MAX_TENSOR_DIMS}"
        )
    count = 1
    nonzero_product = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:  # bool is an int subclass; reject it too
            raise RemoteProtocolError(
                ErrorCode.INVALID_FIELD, f"tensor dimensions must be unsigned integers, got {_kind(dim)} {dim!r:.40}"
            )
        if dim > max_elements:
            raise RemoteProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"tensor dimension {dim} > element limit {max_elements}"
            )
        count *= dim  # every factor <= max_elements and <= 8 factors: a small int
        nonzero_product *= dim or 1
    # The product without the zeros bounds an empty tensor too: [2**24, 2**24, 2**24, 0]
    # holds nothing, but its strides overflow int64 (a crash found by fuzzing).
    if nonzero_product > max_elements:
        raise RemoteProtocolError(
            ErrorCode.LIMIT_EXCEEDED,
            f"tensor of shape {list(shape)} has {count} elements, {nonzero_product} without its zero "
            f"dimensions > limit {max_elements}",
        )
    return count


def _decompress(data: bytes | bytearray, expected: int) -> bytes:
    """Decompress one zstd frame whose declared content size must equal ``expected`` (§4.4)."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(ErrorCode.INVALID_TENSOR, f"bad zstd frame header: {exc}") from None
    if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
        raise RemoteProtocolError(ErrorCode.INVALID_TENSOR, "zstd frame does not declare its content size")
    if params.content_size != expected:
        raise RemoteProtocolError(
            ErrorCode.INVALID_TENSOR,
            f"zstd frame declares {params.content_size} bytes, the shape needs {expected}",
        )
    if params.dict_id != 0:
        raise RemoteProtocolError(ErrorCode.INVALID_TENSOR, "zstd frame names a dictionary; none is defined")
    # Only now, with the output size bounded by the checked shape, decompress.
    try:
        out = zstandard.ZstdDecompressor(max_window_size=MAX_FRAME_BYTES).decompress(
            data, max_output_size=expected, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise RemoteProtocolError(ErrorCode.INVALID_TENSOR, f"corrupt zstd data: {exc}") from None
    if len(out) != expected:  # libzstd checks this itself; keep the rule explicit
        raise RemoteProtocolError(
            ErrorCode.INVALID_TENSOR, f"zstd frame decompressed to {len(out)} bytes, not {expected}"
        )
    return out


def _kind(value: object) -> str:
    return type(value).__name__


def _describe_keys(obj: dict) -> str:
    keys = list(obj)[:8]
    return ", ".join(f"{key!r:.20}" for key in keys) + (" ..." if len(obj) > 8 else "")
