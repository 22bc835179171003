"""The safetensors file format, as far as the weights code needs it: headers only.

A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus an optional
``__metadata__``), then the tensors' raw bytes. We read headers to find a tensor's
bytes without loading it, and write a header in front of a part's bytes so that a
fetched part *is* a safetensors file (its data section is the part's byte stream).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from biopetals.protocol.manifest import TensorEntry

__all__ = ["TensorLocation", "read_header", "header_bytes", "SafetensorsError"]

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsError(ValueError):
    """A file is not a readable safetensors file."""


@dataclass(frozen=True)
class TensorLocation:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of its first byte in the file
    end: int


def read_header(path: str | Path) -> dict[str, TensorLocation]:
    """Tensor name -> where its bytes lie in the file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header of {length} bytes")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise SafetensorsError(f"{path}: header is not JSON: {exc}") from None
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            out[name] = TensorLocation(info["dtype"], tuple(info["shape"]), base + begin, base + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise SafetensorsError(f"{path}: bad entry for {name!r}: {exc}") from None
    return out


def header_bytes(tensors: tuple[TensorEntry, ...], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix and header of a file whose data section is exactly ``tensors``'
    bytes in order (a manifest part). Padded with spaces to 8 bytes, as safetensors does."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.offset + t.size]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
