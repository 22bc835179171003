"""Fuzz targets for the tensor codec (spec/tensors.md §3-§4) and message framing (§6).

Invariant (h11's): any input is either decoded or raises RemoteProtocolError. Extra checks
turn silent misbehaviour into crashes: a decoded tensor has the declared element count and
is writable; a frame decoder gives the same frames (or the same error) whether the bytes
arrive at once or one at a time, and every frame it returns is within its limit.
"""

from __future__ import annotations

import msgpack
import torch
import zstandard

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.framing import FrameDecoder
from biopetals.protocol.limits import MAX_TENSOR_ELEMENTS
from biopetals.protocol.tensors import decode_tensor, unpack_tensor

# A small limit makes the limit paths reachable with the short inputs fuzzers produce.
_SMALL_FRAME_LIMIT = 64


def tensor(data: bytes) -> None:
    """The standalone decoder, bytes to tensor."""
    t = unpack_tensor(data)
    if t.numel() > MAX_TENSOR_ELEMENTS:
        raise AssertionError(f"decoded {t.numel()} elements")
    t.add_(0)  # writable, not aliasing a read-only buffer


def tensor_embedded(data: bytes) -> None:
    """decode_tensor on whatever msgpack object the bytes are, as a message codec would call it."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False, max_bin_len=1 << 20)
    except (ValueError, TypeError, msgpack.UnpackException):
        return  # not msgpack: the message codec rejects it before any tensor is seen
    t = decode_tensor(obj, max_elements=1 << 16)
    if t.numel() > 1 << 16:
        raise AssertionError(f"decoded {t.numel()} elements over the receiver's limit")


_CODEC_CHOICES = ("f32", "bf16", "f16", "f16+zstd", "f16+zst", "")


def tensor_structured(data: bytes) -> None:
    """Build a nearly valid tensor from the bytes, so the size and zstd checks are reached.

    Byte 0 picks the codec, byte 1 the rank (0-9), then one byte per dimension (0-7, or
    2**24 for 0xff); byte k picks how the rest becomes the data: raw, a zstd frame with or
    without content size or with a checksum, or a frame with its last byte cut. A raw
    tensor that decodes must hold exactly the bytes given.
    """
    if len(data) < 3:
        return
    codec = _CODEC_CHOICES[data[0] % len(_CODEC_CHOICES)]
    rank = data[1] % 10
    dims = [(1 << 24) if b == 0xFF else b % 8 for b in data[2 : 2 + rank]]
    rest = data[2 + rank :]
    mode, body = (rest[0] % 5, rest[1:]) if rest else (0, b"")
    if mode == 1:
        body = zstandard.ZstdCompressor(level=1).compress(body)
    elif mode == 2:
        body = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(body)
    elif mode == 3:
        body = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(body)
    elif mode == 4:
        body = zstandard.ZstdCompressor(level=1).compress(body)[:-1]
    t = unpack_tensor(msgpack.packb({0: codec, 1: dims, 2: body}, use_bin_type=True))
    if list(t.shape) != dims:
        raise AssertionError(f"decoded shape {list(t.shape)} != declared {dims}")
    # (the hosts we fuzz on are little-endian, so native bytes are wire bytes)
    if mode == 0 and t.numel() and t.reshape(-1).view(torch.uint8).numpy().tobytes() != body:
        raise AssertionError("decoded raw tensor does not hold the bytes sent")


def _frames(data: bytes, byte_by_byte: bool) -> tuple[list[bytes], str]:
    decoder = FrameDecoder(max_frame_bytes=_SMALL_FRAME_LIMIT)
    frames: list[bytes] = []
    try:
        chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data] if data else []
        for chunk in [*chunks, b""]:  # b"": end of stream
            decoder.receive_data(chunk)
            while (frame := decoder.next_frame()) is not None:
                if not 0 < len(frame) <= _SMALL_FRAME_LIMIT:
                    raise AssertionError(f"returned a frame of {len(frame)} bytes")
                frames.append(frame)
        return frames, "ok"
    except RemoteProtocolError as exc:
        return frames, ErrorCode(exc.code).name


def frames(data: bytes) -> None:
    """FrameDecoder fed the whole input at once."""
    got, outcome = _frames(data, byte_by_byte=False)
    if outcome != "ok":
        raise RemoteProtocolError(ErrorCode[outcome], "frame stream rejected")


def frames_bytewise(data: bytes) -> None:
    """FrameDecoder fed one byte at a time; must agree exactly with the whole-input run."""
    whole = _frames(data, byte_by_byte=False)
    bytewise = _frames(data, byte_by_byte=True)
    if whole != bytewise:
        raise AssertionError(f"whole input gave {whole}, byte by byte gave {bytewise}")


TARGETS = {
    "tensor": (tensor, ["tensors.json"]),
    "tensor_embedded": (tensor_embedded, ["tensors.json"]),
    "tensor_structured": (tensor_structured, []),
    "frames": (frames, ["frames.json"]),
    "frames_bytewise": (frames_bytewise, ["frames.json"]),
}
