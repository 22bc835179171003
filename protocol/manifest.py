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

The document's structure (its objects, fields, types, ranges, patterns and limits) is
declared as tables (``MANIFEST_TABLE``, ``PART_TABLE``, ``TENSOR_TABLE``, ``FILE_TABLE``)
read by the one generic routine of protocol/json_table.py, rows in the check order of
spec/weights.md §2.5; rules that tie fields together are named ``Rule`` rows. JSON itself
is decoded by ``json`` with strictness hooks (no NaN, no overflow, no repeated key).

Sans-IO: bytes in, values out. ``parse_manifest`` raises only ``RemoteProtocolError``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final, Iterator

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.json_table import (
    POSITION, AnyObject, HexDigest, JsonObject, JsonText, JsonUInt, Key, OneOf, PowerOfTwo, Rule, read_object,
)
from biopetals.protocol.limits import MAX_BLOCKS, MiB
from biopetals.protocol.table import ArrayOf, Violation

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
    "MANIFEST_TABLE",
    "PART_TABLE",
    "TENSOR_TABLE",
    "FILE_TABLE",
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
#: A fetcher's own files end so (spec/weights.md §2.2): no file of the ``files`` part may.
_FETCHER_FILES: Final = (".safetensors", ".partial", ".tmp")
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
    if not isinstance(doc, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "manifest: top level must be an object")
    reading = _Reading()
    try:
        read_object(doc, MANIFEST_TABLE, reading, "manifest", values=reading.doc)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, exc.message) from None
    return _build(raw, reading.doc)


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


# The document's tables (spec/weights.md §2.2), rows in the check order of §2.5. Rules that
# tie one field to another, or to the rest of the document, are named rows of the table.


@dataclass
class _Reading:
    """What the rules of a manifest being read share: the top-level values, the names seen."""

    doc: dict[str, Any] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)  # tensor and file names share one namespace

    def part_name(self, position: int) -> str:
        blocks = self.doc["num_blocks"]
        return f"block.{position}" if position < blocks else ("client", "files")[position - blocks]


def _fail(message: str) -> None:
    raise Violation(ErrorCode.INVALID_FIELD, message)


def _config_layers(doc: dict[str, Any], _: _Reading) -> None:
    layers = doc["config"].get("num_hidden_layers")
    if type(layers) is not int or layers != doc["num_blocks"]:
        _fail("config.num_hidden_layers differs from num_blocks")


def _config_architectures(doc: dict[str, Any], _: _Reading) -> None:
    archs = doc["config"].get("architectures")
    if not isinstance(archs, list) or doc["architecture"] not in archs:
        _fail("config.architectures does not list the manifest's architecture")


def _unique_name(entry: dict[str, Any], reading: _Reading) -> None:
    if entry["name"] in reading.names:
        _fail(f"name {entry['name'][:80]!r} repeated")
    reading.names.add(entry["name"])


def _positional_name(part: dict[str, Any], reading: _Reading) -> None:
    expected = reading.part_name(part[POSITION])
    if part["name"] != expected:
        _fail(f"name {part['name'][:40]!r}: expected {expected!r}")


def _entries_size(part: dict[str, Any]) -> int:
    if part["name"] == "files":
        return sum(entry["size"] for entry in part["files"])
    return sum(math.prod(entry["shape"]) * DTYPE_SIZES[entry["dtype"]] for entry in part["tensors"])


def _size_adds_up(part: dict[str, Any], _: _Reading) -> None:
    if part["size"] != (total := _entries_size(part)):
        _fail(f"size {part['size']}: its entries add up to {total}")


def _blocks_have_tensors(doc: dict[str, Any], _: _Reading) -> None:
    for part in doc["parts"][:-1]:
        if not part["tensors"]:
            _fail(f"part {part['name']} has no tensors")


def _chunks_needed(part: dict[str, Any], reading: _Reading) -> int:
    return chunk_count(part["size"], reading.doc["chunk_size"])


#: The manifest can hold no more entries than it has bytes: the only bound on an entry list.
_ENTRIES: Final = MAX_MANIFEST_BYTES

TENSOR_TABLE: Final = (
    Key("name", JsonText(1, _MAX_TENSOR_NAME, reserved=frozenset({"__metadata__"}))),  # safetensors' own key
    Rule("name unique across the manifest", _unique_name),
    Key("dtype", OneOf(frozenset(DTYPE_SIZES))),
    Key("shape", ArrayOf(JsonUInt(), _MAX_DIMS, high=ErrorCode.INVALID_FIELD)),
)

FILE_TABLE: Final = (
    Key("name", JsonText(pattern=_FILE_NAME, reserved=_RESERVED_FILES, reserved_endings=_FETCHER_FILES)),
    Rule("name unique across the manifest", _unique_name),
    Key("size", JsonUInt()),
)

PART_TABLE: Final = (
    Key("name", JsonText()),
    Rule("name required by the part's position", _positional_name),
    Key("files", ArrayOf(JsonObject(FILE_TABLE), _ENTRIES), when=lambda part, _: part["name"] == "files"),
    Key("tensors", ArrayOf(JsonObject(TENSOR_TABLE), _ENTRIES), when=lambda part, _: part["name"] != "files"),
    Key("size", JsonUInt()),
    Rule("size is the sum of the entries' sizes", _size_adds_up),
    Key("chunks", ArrayOf(HexDigest(), MAX_CHUNKS_PER_PART, high=ErrorCode.LIMIT_EXCEEDED),
        count=_chunks_needed, items="chunk hashes"),
)

MANIFEST_TABLE: Final = (
    Key("format", JsonUInt(MANIFEST_FORMAT, MANIFEST_FORMAT, low=ErrorCode.UNSUPPORTED_VERSION,
                           high=ErrorCode.UNSUPPORTED_VERSION)),
    Key("name", JsonText(pattern=_NAME)),
    Key("architecture", JsonText(1, 128)),
    Key("num_blocks", JsonUInt(1, MAX_BLOCKS)),
    Key("chunk_size", PowerOfTwo(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)),
    Key("config", AnyObject()),
    Rule("config.num_hidden_layers is num_blocks", _config_layers),
    Rule("config.architectures lists architecture", _config_architectures),
    Key("parts", ArrayOf(JsonObject(PART_TABLE), MAX_BLOCKS + 2, high=ErrorCode.INVALID_FIELD),
        count=lambda doc, _: doc["num_blocks"] + 2, items="parts"),
    Rule("block and client parts have tensors", _blocks_have_tensors),
)


def _build(raw: bytes, doc: dict[str, Any]) -> Manifest:
    """The ``Manifest`` of a document its tables accepted: entries get their offsets."""
    parts = []
    for index, part in enumerate(doc["parts"]):
        tensors: list[TensorEntry] = []
        files: list[FileEntry] = []
        offset = 0
        for entry in part.get("tensors", ()):
            tensors.append(TensorEntry(entry["name"], entry["dtype"], entry["shape"], offset))
            offset += tensors[-1].size
        for entry in part.get("files", ()):
            files.append(FileEntry(entry["name"], offset, entry["size"]))
            offset += entry["size"]
        parts.append(Part(index, part["name"], tuple(tensors), tuple(files), part["size"], part["chunks"]))
    return Manifest(raw, doc["name"], doc["architecture"], doc["num_blocks"], doc["chunk_size"], doc["config"],
                    tuple(parts))
