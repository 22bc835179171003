"""Fuzz targets for the tensor codec (spec/tensors.md §3-§4) and message framing (§6).

Invariant (h11's): any input is either decoded or raises RemoteProtocolError. Extra checks
turn silent misbehaviour into crashes: a decoded tensor has the declared element count and
is writable; a frame decoder gives the same frames (or the same error) whether the bytes
arrive at once or one at a time, and every frame it returns is within its limit.
"""

from __future__ import annotations

import msgpack

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
    "frames": (frames, ["frames.json"]),
    "frames_bytewise": (frames_bytewise, ["frames.json"]),
}
