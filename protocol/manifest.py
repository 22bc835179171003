"""The weights manifest: which bytes make up a model, cut into hash-verified chunks.

See spec/weights.md §2. A manifest is a JSON document (written canonically by
``encode_manifest``: sorted keys, no spaces, ASCII) that lists, part by part, the
tensors of a checkpoint and the SHA-256 of every fixed-size chunk of the part's bytes.
Its own SHA-256 (over the exact bytes) goes into the model's swarm name
(``swarm_name``), so two peers that agree on the name agree on every weight byte.

Parts, in this order (``num_blocks + 2`` of them):

* ``block.<i>`` for every transformer block ``i``: the block's tensors;
* ``client``: everything that is not a block (embeddings, final norm, LM head);
* ``files``: the other files a client needs (tokenizer), concatenated.

A part's bytes are its tensors' raw little-endian bytes (exactly as safetensors stores
them), concatenated in the listed order; chunk ``j`` is bytes
``[j * chunk_size, min((j + 1) * chunk_size, size))``.

Sans-IO: bytes in, values out. ``parse_manifest`` raises only ``RemoteProtocolError``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Iterator

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_BLOCKS, MiB

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FILE",
    "MAX_MANIFEST_BYTES",
    "DEFAULT_CHUNK_SIZE",
    "MIN_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_CHUNKS_PER_PART",
    "DTYPE_SIZES",
    "TensorEntry",
    "FileEntry",
    "Part",
    "Manifest",
    "parse_manifest",
    "encode_manifest",
    "manifest_hash",
    "swarm_name",
    "is_swarm_name",
    "chunk_count",
]

#: ``format`` of this revision (spec/weights.md §2.1).
MANIFEST_FORMAT: Final = 1
#: The manifest's file name inside a checkpoint directory.
MANIFEST_FILE: Final = "biopetals-manifest.json"
#: Largest manifest: a 405B model at 4 MiB chunks is ~13 MiB of JSON.
MAX_MANIFEST_BYTES: Final = 32 * MiB
#: Chunk sizes: a power of two in [1 MiB, 16 MiB]; 4 MiB by default (spec/weights.md §2.3).
MIN_CHUNK_SIZE: Final = 1 * MiB
MAX_CHUNK_SIZE: Final = 16 * MiB
DEFAULT_CHUNK_SIZE: Final = 4 * MiB
#: Most chunks in one part: ``GetChunk.index`` is below it (16 GiB at 1 MiB, 256 GiB at 16 MiB).
MAX_CHUNKS_PER_PART: Final = 1 << 14
#: Digits of the manifest hash in the swarm name: 64 bits, so no swarm member can make a
#: second manifest with the same name (2**64 hashes).
NAME_HASH_DIGITS: Final = 16

#: safetensors dtype names and their element sizes in bytes.
DTYPE_SIZES: Final = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}$")
_SWARM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,199}\.[0-9a-f]{%d}$" % NAME_HASH_DIGITS)
#: A file of the ``files`` part is written into the checkpoint directory under this name.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_RESERVED_FILES: Final = frozenset({MANIFEST_FILE, "config.json", "model.safetensors.index.json"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_TENSOR_NAME: Final = 256
_MAX_DIMS: Final = 8


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of its first byte in the part

    @property
    def size(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class FileEntry:
    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class Part:
    index: int
    name: str  # "block.<i>", "client" or "files"
    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...]
    size: int
    chunks: tuple[bytes, ...]  # SHA-256 of each chunk


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest; ``raw`` are the exact bytes its ``hash`` covers."""

    raw: bytes
    name: str
    architecture: str
    num_blocks: int
    chunk_size: int
    config: dict[str, Any]
    parts: tuple[Part, ...]

    @functools.cached_property  # asked on every chunk request a node serves
    def hash(self) -> bytes:
        return manifest_hash(self.raw)

    @functools.cached_property
    def swarm_name(self) -> str:
        return swarm_name(self.name, self.hash)

    @property
    def client_part(self) -> int:
        return self.num_blocks

    @property
    def files_part(self) -> int:
        return self.num_blocks + 1

    def block_part(self, block: int) -> int:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} not in 0:{self.num_blocks}")
        return block

    def chunk_range(self, part: int, index: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of chunk ``index`` inside part ``part``."""
        size = self.parts[part].size
        start = index * self.chunk_size
        if not 0 <= start < size:
            raise ValueError(f"chunk {index} is not in part {part} ({len(self.parts[part].chunks)} chunks)")
        return start, min(start + self.chunk_size, size)

    def iter_chunks(self, parts: list[int]) -> Iterator[tuple[int, int]]:
        for part in parts:
            for index in range(len(self.parts[part].chunks)):
                yield part, index


def manifest_hash(raw: bytes) -> bytes:
    """SHA-256 of the manifest's exact bytes."""
    return hashlib.sha256(raw).digest()


def swarm_name(name: str, digest: bytes) -> str:
    """``"<name>.<first 16 hex digits of the manifest hash>"`` (spec/weights.md §2.4)."""
    return f"{name}.{digest.hex()[:NAME_HASH_DIGITS]}"


def is_swarm_name(text: str) -> bool:
    """True when ``text`` has the shape of a manifest-derived swarm name."""
    return bool(_SWARM_NAME.fullmatch(text))


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


# ----------------------------------------------------------------------------- encoding


def encode_manifest(document: dict[str, Any]) -> bytes:
    """Canonical bytes of a manifest document (spec/weights.md §2.1); checked by parsing them."""
    try:
        raw = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"manifest is not JSON-serialisable: {exc}") from None
    try:
        parse_manifest(raw)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    return raw


# ----------------------------------------------------------------------------- decoding


class _Bad(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _field(obj: dict, key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}: {key!r} absent")
    value = obj[key]
    if kind is int:
        ok = type(value) is int and value >= 0
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_manifest(raw: bytes | bytearray | memoryview) -> Manifest:
    """Parse and check a manifest (spec/weights.md §2.5). Raises only ``RemoteProtocolError``."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(ErrorCode.MALFORMED, f"expected bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RemoteProtocolError(ErrorCode.LIMIT_EXCEEDED, f"manifest of {len(raw)} bytes > {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"manifest is not UTF-8 JSON: {exc}") from None
    try:
        return _parse_document(raw, doc)
    except _Bad as exc:
        raise RemoteProtocolError(exc.code, f"manifest: {exc.message}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"{text[:40]} overflows a double")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Two readers must never see different values in the same hashed bytes: no repeated keys."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"repeated key {key[:40]!r}")
        out[key] = value
    return out


def _text(value: str, pattern: re.Pattern | None, where: str) -> str:
    """A string that is valid Unicode (no lone surrogates) and, if given, matches ``pattern`` whole."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}: not valid Unicode (a lone surrogate)") from None
    if pattern is not None and not pattern.fullmatch(value):
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where} {value[:80]!r}: does not match {pattern.pattern}")
    return value


def _parse_document(raw: bytes, doc: object) -> Manifest:
    if not isinstance(doc, dict):
        raise _Bad(ErrorCode.MALFORMED, "top level must be an object")
    fmt = _field(doc, "format", int, "manifest")
    if fmt != MANIFEST_FORMAT:
        raise _Bad(ErrorCode.UNSUPPORTED_VERSION, f"format {fmt}; this side reads {MANIFEST_FORMAT}")
    name = _text(_field(doc, "name", str, "manifest"), _NAME, "name")
    architecture = _text(_field(doc, "architecture", str, "manifest"), None, "architecture")
    if not 1 <= len(architecture) <= 128:
        raise _Bad(ErrorCode.INVALID_FIELD, "architecture: 1 to 128 characters")
    num_blocks = _field(doc, "num_blocks", int, "manifest")
    if not 1 <= num_blocks <= MAX_BLOCKS:
        raise _Bad(ErrorCode.INVALID_FIELD, f"num_blocks {num_blocks} not in 1..{MAX_BLOCKS}")
    chunk_size = _field(doc, "chunk_size", int, "manifest")
    if not (MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE and chunk_size & (chunk_size - 1) == 0):
        raise _Bad(ErrorCode.INVALID_FIELD, f"chunk_size {chunk_size}: need a power of two in [1 MiB, 16 MiB]")
    config = _field(doc, "config", dict, "manifest")
    layers = config.get("num_hidden_layers")
    if type(layers) is not int or layers != num_blocks:
        raise _Bad(ErrorCode.INVALID_FIELD, "config.num_hidden_layers differs from num_blocks")
    archs = config.get("architectures")
    if not isinstance(archs, list) or architecture not in archs:
        raise _Bad(ErrorCode.INVALID_FIELD, "config.architectures does not list the manifest's architecture")
    parts_raw = _field(doc, "parts", list, "manifest")
    if len(parts_raw) != num_blocks + 2:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{len(parts_raw)} parts; need num_blocks + 2 = {num_blocks + 2}")
    expected = [f"block.{i}" for i in range(num_blocks)] + ["client", "files"]
    tensor_names: set[str] = set()
    parts = tuple(
        _parse_part(i, expected[i], part, chunk_size, tensor_names) for i, part in enumerate(parts_raw)
    )
    for i in range(num_blocks + 1):
        if not parts[i].tensors:
            raise _Bad(ErrorCode.INVALID_FIELD, f"part {expected[i]} has no tensors")
    return Manifest(raw, name, architecture, num_blocks, chunk_size, config, parts)


def _parse_part(index: int, expected_name: str, obj: object, chunk_size: int, seen: set[str]) -> Part:
    where = f"parts[{index}]"
    if not isinstance(obj, dict):
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}: expected an object")
    name = _field(obj, "name", str, where)
    if name != expected_name:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}.name {name[:40]!r}: expected {expected_name!r}")
    is_files = name == "files"
    offset = 0
    tensors: list[TensorEntry] = []
    files: list[FileEntry] = []
    if is_files:
        for j, entry in enumerate(_field(obj, "files", list, where)):
            at = f"{where}.files[{j}]"
            if not isinstance(entry, dict):
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}: expected an object")
            file_name = _text(_field(entry, "name", str, at), _FILE_NAME, f"{at}.name")
            if file_name in _RESERVED_FILES or file_name.endswith((".safetensors", ".partial", ".tmp")):
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.name {file_name[:80]!r}: not an allowed file name")
            if file_name in seen:
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.name {file_name!r} repeated")
            seen.add(file_name)
            size = _field(entry, "size", int, at)
            files.append(FileEntry(file_name, offset, size))
            offset += size
    else:
        for j, entry in enumerate(_field(obj, "tensors", list, where)):
            at = f"{where}.tensors[{j}]"
            if not isinstance(entry, dict):
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}: expected an object")
            tensor_name = _text(_field(entry, "name", str, at), None, f"{at}.name")
            if not 1 <= len(tensor_name) <= _MAX_TENSOR_NAME or tensor_name in seen:
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.name {tensor_name[:80]!r}: empty, too long or repeated")
            if tensor_name == "__metadata__":
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.name: __metadata__ is reserved by safetensors")
            seen.add(tensor_name)
            dtype = _field(entry, "dtype", str, at)
            if dtype not in DTYPE_SIZES:
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.dtype {dtype[:20]!r}: not a safetensors dtype")
            shape = _field(entry, "shape", list, at)
            if len(shape) > _MAX_DIMS or any(type(d) is not int or d < 0 for d in shape):
                raise _Bad(ErrorCode.INVALID_FIELD, f"{at}.shape: at most {_MAX_DIMS} non-negative integers")
            tensor = TensorEntry(tensor_name, dtype, tuple(shape), offset)
            tensors.append(tensor)
            offset += tensor.size
    size = _field(obj, "size", int, where)
    if size != offset:
        raise _Bad(ErrorCode.INVALID_FIELD, f"{where}.size {size}: its entries add up to {offset}")
    chunks_raw = _field(obj, "chunks", list, where)
    if len(chunks_raw) > MAX_CHUNKS_PER_PART:
        raise _Bad(ErrorCode.LIMIT_EXCEEDED, f"{where}: {len(chunks_raw)} chunks > {MAX_CHUNKS_PER_PART} "
                                             f"(GetChunk.index is below it): use larger chunks")
    if len(chunks_raw) != chunk_count(size, chunk_size):
        raise _Bad(ErrorCode.INVALID_FIELD,
                   f"{where}: {len(chunks_raw)} chunk hashes; size {size} at chunk_size {chunk_size} needs "
                   f"{chunk_count(size, chunk_size)}")
    chunks = []
    for j, digest in enumerate(chunks_raw):
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise _Bad(ErrorCode.INVALID_FIELD, f"{where}.chunks[{j}]: expected 64 lower-case hex digits")
        chunks.append(bytes.fromhex(digest))
    return Part(index, name, tuple(tensors), tuple(files), size, tuple(chunks))
