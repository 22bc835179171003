"""Generate spec/vectors/weights.json: weights manifests, weights-protocol messages, provider records.

Run from the repository root:  .venv/bin/python spec/vectors/generate_weights.py
(``--check`` exits 1 if the committed file differs from what would be generated).

Every vector has a ``kind``: ``"message"`` (a frame payload of ``/biopetals/weights/1``,
spec/weights.md §3), ``"provider"`` (a DHT provider record value, §4) or ``"manifest"``
(the manifest's JSON bytes, §2). Lists (spec/README.md §5):

- ``valid``: canonical bytes. Encoding ``fields`` gives ``hex`` exactly; decoding ``hex``
  gives ``fields``.
- ``accepted``: non-canonical bytes a reader MUST accept (keys out of order, unknown keys,
  nil for an absent field; a manifest with spaces or unknown keys): decoding ``hex`` gives
  ``fields``.
- ``invalid``: decoding ``hex`` fails with exactly ``error``; ``rule`` names the rule.

``fields``:

- message: ``{"type": <GetManifest|ManifestData|GetChunk|ChunkData|Error>, <field>: <value>}``,
  bytes as hex, an ``Error`` code by its name (a number when unknown);
- provider: ``{"format": 1, "manifest_hash": hex, "ranges": [...][, "addrs": [...]]}``;
- manifest: ``{"document": <the JSON document>, "sha256": hex, "swarm_name": ..., "parts":
  [{"name", "size", "chunks": n, "offsets": [first byte of each tensor or file]}], "data": ...}``
  where ``data`` says what the parts' bytes are, so that the chunk hashes can be checked:
  ``{"<part name>": hex}``, or ``{"<part name>": "pattern"}`` for "byte k of the part is
  k mod 251".

Invalid and accepted bytes are written with msgpack-python / json directly (plus byte
surgery), never with the codecs under test.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.manifest import encode_manifest
from biopetals.protocol.weights import (
    ChunkData,
    Error,
    GetChunk,
    GetManifest,
    ManifestData,
    ProviderRecord,
    encode_provider,
    encode_weights_message,
)

OUT = Path(__file__).with_name("weights.json")
MiB = 1 << 20

PEER = "12D3KooWKCtS9ZkXQ2ts6bMk3TZhhRfXsY39eAB2BrdQa5RMifXy"
ADDR = f"/ip4/10.0.0.5/tcp/31337/p2p/{PEER}"

# ----------------------------------------------------------------------------- manifests

ARCH = "LlamaForCausalLM"


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def bf16(*values: float) -> bytes:
    return b"".join(struct.pack("<f", v)[2:] for v in values)


#: The bytes of the small manifest's parts: tensors' raw little-endian bytes, concatenated.
SMALL_DATA: dict[str, bytes] = {
    "block.0": f32(1.0, 2.0, 3.0, 4.0) + bf16(0.5, -0.5),
    "block.1": f32(-1.0, -2.0, -3.0, -4.0) + bf16(0.25, -0.25),
    "client": f32(*[float(i) for i in range(8)]) + f32(1.0, 1.0),
    "files": b'{"version":"1.0"}' + b'{"bos_token":"<s>"}',
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def small_document() -> dict:
    """A 2-block model: every part one chunk; the files part holds two files."""
    def block(i: int) -> dict:
        return {"name": f"block.{i}", "size": len(SMALL_DATA[f"block.{i}"]), "chunks": [sha(SMALL_DATA[f"block.{i}"])],
                "tensors": [{"name": f"model.layers.{i}.mlp.weight", "dtype": "F32", "shape": [2, 2]},
                            {"name": f"model.layers.{i}.norm.weight", "dtype": "BF16", "shape": [2]}]}

    return {
        "format": 1,
        "name": "tiny-llama",
        "architecture": ARCH,
        "num_blocks": 2,
        "chunk_size": 4 * MiB,
        "config": {"architectures": [ARCH], "hidden_size": 2, "model_type": "llama", "num_hidden_layers": 2},
        "parts": [
            block(0),
            block(1),
            {"name": "client", "size": len(SMALL_DATA["client"]), "chunks": [sha(SMALL_DATA["client"])],
             "tensors": [{"name": "model.embed_tokens.weight", "dtype": "F32", "shape": [4, 2]},
                         {"name": "model.norm.weight", "dtype": "F32", "shape": [2]}]},
            {"name": "files", "size": len(SMALL_DATA["files"]), "chunks": [sha(SMALL_DATA["files"])],
             "files": [{"name": "generation_config.json", "size": 17}, {"name": "tokenizer.json", "size": 19}]},
        ],
    }


PATTERN_SIZE = MiB + 4  # one F32 tensor of 262145 elements: two chunks at 1 MiB, the second 4 bytes


def pattern(size: int) -> bytes:
    return bytes(k % 251 for k in range(size))


def two_chunk_document() -> dict:
    """One block at the smallest chunk size whose part takes two chunks; a zero-size tensor; no files."""
    data = pattern(PATTERN_SIZE)
    client = f32(0.0, 1.0)
    return {
        "format": 1,
        "name": "a" * 200,  # the longest name
        "architecture": ARCH,
        "num_blocks": 1,
        "chunk_size": 1 * MiB,
        "config": {"architectures": ["Other", ARCH], "num_hidden_layers": 1},
        "parts": [
            {"name": "block.0", "size": PATTERN_SIZE, "chunks": [sha(data[:MiB]), sha(data[MiB:])],
             "tensors": [{"name": "w", "dtype": "F32", "shape": [262145]},
                         {"name": "empty", "dtype": "I64", "shape": [0, 3]}]},
            {"name": "client", "size": 8, "chunks": [sha(client)],
             "tensors": [{"name": "lm_head.weight", "dtype": "F32", "shape": [2]}]},
            {"name": "files", "size": 0, "chunks": [], "files": []},
        ],
    }


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def manifest_fields(document: dict, raw: bytes, data: dict[str, str]) -> dict:
    digest = hashlib.sha256(raw).hexdigest()
    parts = []
    for part in document["parts"]:
        offsets, at = [], 0
        for entry in part.get("files", part.get("tensors", [])):
            offsets.append(at)
            at += entry["size"] if "size" in entry else _tensor_size(entry)
        parts.append({"name": part["name"], "size": part["size"], "chunks": len(part["chunks"]), "offsets": offsets})
    return {"document": document, "sha256": digest, "swarm_name": f"{document['name']}.{digest[:16]}",
            "parts": parts, "data": data}


_DTYPE_SIZES = {"F32": 4, "BF16": 2, "I64": 8}


def _tensor_size(entry: dict) -> int:
    n = 1
    for d in entry["shape"]:
        n *= d
    return n * _DTYPE_SIZES[entry["dtype"]]


def valid_manifests() -> list[dict]:
    out = []
    for name, document, data in [
        ("manifest: two blocks, two files", small_document(), {k: v.hex() for k, v in SMALL_DATA.items()}),
        ("manifest: a part of two chunks, the longest name, no files", two_chunk_document(),
         {"block.0": "pattern", "client": f32(0.0, 1.0).hex(), "files": ""}),
    ]:
        raw = canonical_json(document)
        assert encode_manifest(document) == raw, name  # the codec agrees with a plain JSON writer
        out.append({"kind": "manifest", "name": name, "fields": manifest_fields(document, raw, data), "hex": raw.hex()})
    return out


def accepted_manifests() -> list[dict]:
    document = small_document()
    canonical = canonical_json(document)
    spaced = json.dumps(document, indent=2).encode()  # keys in writing order, spaces, newlines
    unknown = canonical_json({**document, "x-comment": "ignored", "parts": [
        {**p, "x-note": 1} for p in document["parts"]]})
    out = []
    for name, raw in [("manifest with spaces and unsorted keys", spaced),
                      ("manifest with unknown keys", unknown)]:
        assert raw != canonical
        # The hash is over the exact bytes: another spelling is another manifest, another name.
        fields = manifest_fields(json.loads(raw), raw, {k: v.hex() for k, v in SMALL_DATA.items()})
        out.append({"kind": "manifest", "name": name, "fields": fields, "hex": raw.hex()})
    return out


def _doc_with(path: tuple, value: Any, base: dict | None = None) -> dict:
    """A copy of the small document with the item at ``path`` replaced (``_DROP``: removed)."""
    document = json.loads(json.dumps(base or small_document()))
    target = document
    for key in path[:-1]:
        target = target[key]
    if value is _DROP:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return document


_DROP = object()


def invalid_manifests() -> list[dict]:
    good = canonical_json(small_document())
    block0 = small_document()["parts"][0]
    files = small_document()["parts"][3]

    def files_named(*names: str) -> dict:
        entries = [{"name": n, "size": 1} for n in names]
        return {**files, "files": entries, "size": len(entries), "chunks": [sha(b"x" * len(entries))]}

    def doc(path: tuple, value: Any) -> bytes:
        return canonical_json(_doc_with(path, value))

    def with_part(index: int, part: dict) -> bytes:
        return doc(("parts", index), part)

    def tensor(**changes: Any) -> bytes:
        return doc(("parts", 0, "tensors", 0), {**block0["tensors"][0], **changes})

    wrong_order = small_document()
    wrong_order["parts"][0], wrong_order["parts"][1] = wrong_order["parts"][1], wrong_order["parts"][0]
    client_first = small_document()
    client_first["parts"].insert(0, client_first["parts"].pop(2))
    cases: list[tuple[str, bytes, str, str]] = [
        # §2.5 steps 1-2: bytes, JSON
        ("manifest not UTF-8", good.replace(b"tiny-llama", b"tiny-\xffllama"), "MALFORMED", "§2.5 step 2 UTF-8"),
        ("manifest not JSON", good[:-1], "MALFORMED", "§2.5 step 2 JSON"),
        ("manifest empty", b"", "MALFORMED", "§2.5 step 2 JSON"),
        ("manifest with NaN", good.replace(b'"hidden_size":2', b'"hidden_size":NaN'), "MALFORMED", "§2.5 step 2 NaN"),
        ("manifest with Infinity", good.replace(b'"hidden_size":2', b'"hidden_size":-Infinity'), "MALFORMED", "§2.5 step 2 NaN"),
        ("manifest is an array", canonical_json([small_document()]), "MALFORMED", "§2.5 step 3"),
        # §2.5 step 4: format
        ("manifest format 2", doc(("format",), 2), "UNSUPPORTED_VERSION", "§2.5 step 4"),
        ("manifest format 0", doc(("format",), 0), "UNSUPPORTED_VERSION", "§2.5 step 4"),
        ("manifest format absent", doc(("format",), _DROP), "INVALID_FIELD", "§2.5 step 4"),
        ("manifest format a string", doc(("format",), "1"), "INVALID_FIELD", "§2.5 step 4"),
        # §2.2 top-level fields
        ("manifest name absent", doc(("name",), _DROP), "INVALID_FIELD", "§2.2 name"),
        ("manifest name upper case", doc(("name",), "Tiny"), "INVALID_FIELD", "§2.2 name"),
        ("manifest name starts with a dot", doc(("name",), ".tiny"), "INVALID_FIELD", "§2.2 name"),
        ("manifest name with a slash", doc(("name",), "org/tiny"), "INVALID_FIELD", "§2.2 name"),
        ("manifest name of 201 characters", doc(("name",), "a" * 201), "INVALID_FIELD", "§2.2 name"),
        ("manifest name empty", doc(("name",), ""), "INVALID_FIELD", "§2.2 name"),
        ("manifest architecture empty", doc(("architecture",), ""), "INVALID_FIELD", "§2.2 architecture"),
        ("manifest architecture of 129 characters", doc(("architecture",), "A" * 129), "INVALID_FIELD", "§2.2 architecture"),
        ("manifest num_blocks 0", doc(("num_blocks",), 0), "INVALID_FIELD", "§2.2 num_blocks"),
        ("manifest num_blocks 1025", doc(("num_blocks",), 1025), "INVALID_FIELD", "§2.2 num_blocks"),
        ("manifest num_blocks negative", doc(("num_blocks",), -2), "INVALID_FIELD", "§2.2 num_blocks"),
        ("manifest num_blocks a float", doc(("num_blocks",), 2.0), "INVALID_FIELD", "§2.2 num_blocks"),
        ("manifest num_blocks true", doc(("num_blocks",), True), "INVALID_FIELD", "§2.2 num_blocks"),
        ("manifest chunk_size 3 MiB", doc(("chunk_size",), 3 * MiB), "INVALID_FIELD", "§2.3 chunk_size"),
        ("manifest chunk_size 512 KiB", doc(("chunk_size",), MiB // 2), "INVALID_FIELD", "§2.3 chunk_size"),
        ("manifest chunk_size 32 MiB", doc(("chunk_size",), 32 * MiB), "INVALID_FIELD", "§2.3 chunk_size"),
        ("manifest chunk_size 0", doc(("chunk_size",), 0), "INVALID_FIELD", "§2.3 chunk_size"),
        ("manifest config not an object", doc(("config",), [ARCH]), "INVALID_FIELD", "§2.2 config"),
        ("manifest config num_hidden_layers differs", doc(("config", "num_hidden_layers"), 3), "INVALID_FIELD", "§2.2 config"),
        ("manifest config without num_hidden_layers", doc(("config", "num_hidden_layers"), _DROP), "INVALID_FIELD", "§2.2 config"),
        ("manifest config architectures not listing it", doc(("config", "architectures"), ["MistralForCausalLM"]), "INVALID_FIELD", "§2.2 config"),
        ("manifest config architectures a string", doc(("config", "architectures"), ARCH), "INVALID_FIELD", "§2.2 config"),
        ("manifest parts not an array", doc(("parts",), {}), "INVALID_FIELD", "§2.2 parts"),
        ("manifest one part too few", doc(("parts",), small_document()["parts"][:3]), "INVALID_FIELD", "§2.2 parts"),
        ("manifest blocks in the wrong order", canonical_json(wrong_order), "INVALID_FIELD", "§2.2 part order"),
        ("manifest client part first", canonical_json(client_first), "INVALID_FIELD", "§2.2 part order"),
        ("manifest part named block.00", with_part(0, {**block0, "name": "block.00"}), "INVALID_FIELD", "§2.2 part order"),
        ("manifest part not an object", with_part(1, ["block.1"]), "INVALID_FIELD", "§2.2 part"),
        # tensors
        ("manifest tensor part without tensors", with_part(0, {k: v for k, v in block0.items() if k != "tensors"}), "INVALID_FIELD", "§2.2 tensors"),
        ("manifest block part with no tensors", with_part(0, {**block0, "tensors": [], "size": 0, "chunks": []}), "INVALID_FIELD", "§2.2 tensors"),
        ("manifest tensor entry not an object", doc(("parts", 0, "tensors", 0), "w"), "INVALID_FIELD", "§2.2 tensors"),
        ("manifest tensor name empty", tensor(name=""), "INVALID_FIELD", "§2.2 tensor name"),
        ("manifest tensor name of 257 characters", tensor(name="t" * 257), "INVALID_FIELD", "§2.2 tensor name"),
        ("manifest tensor name __metadata__", tensor(name="__metadata__"), "INVALID_FIELD", "§2.2 tensor name"),
        ("manifest tensor name repeated in another part", tensor(name="model.layers.1.mlp.weight"), "INVALID_FIELD", "§2.2 tensor name"),
        ("manifest dtype not a safetensors name", tensor(dtype="float32"), "INVALID_FIELD", "§2.2 dtype"),
        ("manifest dtype lower case", tensor(dtype="f32"), "INVALID_FIELD", "§2.2 dtype"),
        ("manifest shape of 9 dimensions", tensor(shape=[1] * 9), "INVALID_FIELD", "§2.2 shape"),
        ("manifest shape negative", tensor(shape=[-2, -2]), "INVALID_FIELD", "§2.2 shape"),
        ("manifest shape a float", tensor(shape=[2.0, 2]), "INVALID_FIELD", "§2.2 shape"),
        ("manifest shape not an array", tensor(shape=4), "INVALID_FIELD", "§2.2 shape"),
        ("manifest size absent", with_part(0, {k: v for k, v in block0.items() if k != "size"}), "INVALID_FIELD", "§2.2 size"),
        ("manifest size differs from the tensors", with_part(0, {**block0, "size": block0["size"] + 1}), "INVALID_FIELD", "§2.2 size"),
        # chunks
        ("manifest one chunk hash too many", with_part(0, {**block0, "chunks": block0["chunks"] * 2}), "INVALID_FIELD", "§2.2 chunks"),
        ("manifest no chunk hashes", with_part(0, {**block0, "chunks": []}), "INVALID_FIELD", "§2.2 chunks"),
        ("manifest chunk hash upper case", with_part(0, {**block0, "chunks": [block0["chunks"][0].upper()]}), "INVALID_FIELD", "§2.2 chunks"),
        ("manifest chunk hash of 63 digits", with_part(0, {**block0, "chunks": [block0["chunks"][0][:63]]}), "INVALID_FIELD", "§2.2 chunks"),
        ("manifest chunk hash not a string", with_part(0, {**block0, "chunks": [1]}), "INVALID_FIELD", "§2.2 chunks"),
        # files
        ("manifest files part without files", with_part(3, {k: v for k, v in files.items() if k != "files"}), "INVALID_FIELD", "§2.2 files"),
        ("manifest file name ../x", with_part(3, files_named("../x")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name with a slash", with_part(3, files_named("sub/x.json")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name starts with a dot", with_part(3, files_named(".env")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name config.json", with_part(3, files_named("config.json")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name of the manifest", with_part(3, files_named("biopetals-manifest.json")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name of the index", with_part(3, files_named("model.safetensors.index.json")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name ending .safetensors", with_part(3, files_named("extra.safetensors")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name of 129 characters", with_part(3, files_named("f" * 129)), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name repeated", with_part(3, files_named("a.txt", "a.txt")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file size absent", doc(("parts", 3, "files", 0, "size"), _DROP), "INVALID_FIELD", "§2.2 files"),
        ("manifest files size differs", with_part(3, {**files, "size": files["size"] - 1}), "INVALID_FIELD", "§2.2 size"),
        # whole-string rules: no trailing newline slips through a pattern; one value per key
        ("manifest name with a trailing newline", doc(("name",), "tiny-llama\n"), "INVALID_FIELD", "§2.2 name"),
        ("manifest file name with a trailing newline", with_part(3, files_named("tokenizer.json\n")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest file name ending .partial", with_part(3, files_named("files.partial")), "INVALID_FIELD", "§2.2 file name"),
        ("manifest chunk hash with a trailing newline", with_part(0, {**block0, "chunks": [block0["chunks"][0] + "\n"]}), "INVALID_FIELD", "§2.2 chunks"),
        ("manifest tensor name with a lone surrogate", tensor(name="w\ud800"), "INVALID_FIELD", "§2.2 tensor name"),
        ("manifest key repeated", good.replace(b'{"architecture"', b'{"format":2,"architecture"', 1), "MALFORMED", "§2.5 step 2 repeated key"),
        ("manifest number overflowing a double", good.replace(b'"hidden_size":2', b'"hidden_size":1e400'), "MALFORMED", "§2.5 step 2 NaN"),
        ("manifest config num_hidden_layers a float", doc(("config", "num_hidden_layers"), 2.0), "INVALID_FIELD", "§2.2 config"),
        ("manifest config num_hidden_layers true", doc(("config", "num_hidden_layers"), True), "INVALID_FIELD", "§2.2 config"),
    ]
    return [{"kind": "manifest", "name": n, "hex": h.hex(), "error": e, "rule": r} for n, h, e, r in cases]


# ----------------------------------------------------------------------------- messages

MESSAGES = {"GetManifest": GetManifest, "ManifestData": ManifestData, "GetChunk": GetChunk, "ChunkData": ChunkData,
            "Error": Error}
TYPES = {"GetManifest": 1, "ManifestData": 2, "GetChunk": 3, "ChunkData": 4, "Error": 15}
KEYS = {
    "GetManifest": {"model": 0},
    "ManifestData": {"manifest": 0},
    "GetChunk": {"manifest_hash": 0, "part": 1, "index": 2},
    "ChunkData": {"part": 0, "index": 1, "data": 2},
    "Error": {"code": 0, "message": 1, "step_id": 2},
}
_BYTES = {"manifest", "manifest_hash", "data"}
HASH = hashlib.sha256(canonical_json(small_document())).digest()
NAME = f"tiny-llama.{HASH.hex()[:16]}"


def _field_values(fields: dict) -> dict[str, Any]:
    """A vector's fields as Python values: hex to bytes, error code names to ``ErrorCode``."""
    values = {}
    for name, value in fields.items():
        if name == "type":
            continue
        if name in _BYTES:
            value = bytes.fromhex(value)
        elif name == "code" and isinstance(value, str):
            value = ErrorCode[value]
        values[name] = value
    return values


def fields_to_message(fields: dict) -> Any:
    return MESSAGES[fields["type"]](**_field_values(fields))


def message_to_fields(message: Any) -> dict:
    name = type(message).__name__
    fields: dict[str, Any] = {"type": name}
    for field in KEYS[name]:
        value = getattr(message, field)
        if value is None:
            continue
        if field in _BYTES:
            value = value.hex()
        elif field == "code":
            value = value.name if isinstance(value, ErrorCode) else int(value)
        fields[field] = value
    return fields


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def plain_body(fields: dict) -> dict:
    """The body map of ``fields`` with msgpack-python only (ascending keys)."""
    keys = KEYS[fields["type"]]
    body = {keys[name]: int(value) if isinstance(value, ErrorCode) else value
            for name, value in _field_values(fields).items()}
    return dict(sorted(body.items()))


def envelope(type_code: Any, body: Any, version: Any = 1) -> dict:
    return {0: version, 1: type_code, 2: body}


def valid_messages() -> list[dict]:
    cases = [
        ("GetManifest", {"type": "GetManifest", "model": NAME}),
        ("ManifestData", {"type": "ManifestData", "manifest": canonical_json(small_document()).hex()}),
        ("GetChunk", {"type": "GetChunk", "manifest_hash": HASH.hex(), "part": 0, "index": 0}),
        ("GetChunk, largest part and index", {"type": "GetChunk", "manifest_hash": HASH.hex(), "part": 1025, "index": 16383}),
        ("ChunkData", {"type": "ChunkData", "part": 2, "index": 0, "data": SMALL_DATA["client"].hex()}),
        ("ChunkData of one byte", {"type": "ChunkData", "part": 300, "index": 7, "data": "00"}),
        ("Error NOT_HELD", {"type": "Error", "code": "NOT_HELD", "message": "this peer does not hold part block.1"}),
        ("Error BUSY", {"type": "Error", "code": "BUSY", "message": "too many chunk requests in flight"}),
        ("Error MODEL_MISMATCH", {"type": "Error", "code": "MODEL_MISMATCH", "message": ""}),
    ]
    out = []
    for name, fields in cases:
        data = encode_weights_message(fields_to_message(fields))
        assert data == pack(envelope(TYPES[fields["type"]], plain_body(fields))), name
        out.append({"kind": "message", "name": name, "fields": fields, "hex": data.hex()})
    return out


def accepted_messages() -> list[dict]:
    fields = {"type": "GetChunk", "manifest_hash": HASH.hex(), "part": 3, "index": 1}
    body = plain_body(fields)
    long_int = pack(envelope(3, body)).replace(b"\x01\x03\x02\x01", b"\x01\xcd\x00\x03\x02\x01", 1)
    assert long_int != pack(envelope(3, body))
    return [
        {"kind": "message", "name": "GetChunk, body keys in descending order", "fields": fields,
         "hex": pack(envelope(3, dict(reversed(list(body.items()))))).hex()},
        {"kind": "message", "name": "GetChunk, unknown keys ignored", "fields": fields,
         "hex": pack({**envelope(3, {**body, 9: "later"}), 7: 1}).hex()},
        {"kind": "message", "name": "GetChunk, part as uint 16", "fields": fields, "hex": long_int.hex()},
    ]


def invalid_messages() -> list[dict]:
    chunk = {0: HASH, 1: 0, 2: 0}
    good = pack(envelope(3, chunk))

    def get_chunk(**changes: Any) -> bytes:
        body = dict(chunk)
        for key, value in changes.items():
            k = {"manifest_hash": 0, "part": 1, "index": 2}[key]
            if value is _DROP:
                del body[k]
            else:
                body[k] = value
        return pack(envelope(3, body))

    def chunk_data(**changes: Any) -> bytes:
        body = {0: 0, 1: 0, 2: b"\x00"}
        body.update({{"part": 0, "index": 1, "data": 2}[k]: v for k, v in changes.items()})
        return pack(envelope(4, {k: v for k, v in body.items() if v is not _DROP}))

    cases: list[tuple[str, bytes, str, str]] = [
        ("empty payload", b"", "MALFORMED", "§3.1, messages §2.5 step 2"),
        ("truncated GetChunk", good[:-5], "MALFORMED", "§3.1, messages §2.5 step 2"),
        ("trailing byte", good + b"\x00", "MALFORMED", "§3.1, messages §2.5 step 2"),
        ("reserved byte 0xc1", b"\xc1", "MALFORMED", "§3.1, messages §2.5 step 2"),
        ("string key", pack({0: 1, 1: 3, 2: chunk, "x": 1}), "MALFORMED", "§3.1, messages §2.5 step 3"),
        ("version 2", pack(envelope(3, chunk, version=2)), "UNSUPPORTED_VERSION", "§3.1, messages §2.5 step 4"),
        ("node protocol type 5 (Step)", pack(envelope(5, chunk)), "UNKNOWN_MESSAGE", "§3.2 types"),
        ("type 16", pack(envelope(16, {})), "UNKNOWN_MESSAGE", "§3.2 types"),
        ("body absent", pack({0: 1, 1: 3}), "MALFORMED", "§3.1, messages §2.5 step 6"),
        ("GetManifest model absent", pack(envelope(1, {})), "INVALID_FIELD", "§3.2 GetManifest"),
        ("GetManifest model empty", pack(envelope(1, {0: ""})), "INVALID_FIELD", "§3.2 GetManifest"),
        ("GetManifest model of 257 bytes", pack(envelope(1, {0: "m" * 257})), "LIMIT_EXCEEDED", "§3.2 GetManifest"),
        ("GetManifest model as bin", pack(envelope(1, {0: NAME.encode()})), "INVALID_FIELD", "§3.2 GetManifest"),
        ("ManifestData empty", pack(envelope(2, {0: b""})), "INVALID_FIELD", "§3.2 ManifestData"),
        ("ManifestData as str", pack(envelope(2, {0: "{}"})), "INVALID_FIELD", "§3.2 ManifestData"),
        ("GetChunk manifest_hash absent", get_chunk(manifest_hash=_DROP), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk manifest_hash of 31 bytes", get_chunk(manifest_hash=HASH[:31]), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk manifest_hash of 33 bytes", get_chunk(manifest_hash=HASH + b"\x00"), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk manifest_hash as hex text", get_chunk(manifest_hash=HASH.hex()), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk part 1026", get_chunk(part=1026), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk part negative", get_chunk(part=-1), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk part true", get_chunk(part=True), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk part absent", get_chunk(part=_DROP), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk index 16384", get_chunk(index=16384), "INVALID_FIELD", "§3.2 GetChunk"),
        ("GetChunk index a float", get_chunk(index=0.0), "INVALID_FIELD", "§3.2 GetChunk"),
        ("ChunkData data empty", chunk_data(data=b""), "INVALID_FIELD", "§3.2 ChunkData"),
        ("ChunkData data absent", chunk_data(data=_DROP), "INVALID_FIELD", "§3.2 ChunkData"),
        ("ChunkData part 1026", chunk_data(part=1026), "INVALID_FIELD", "§3.2 ChunkData"),
        ("ChunkData index 16384", chunk_data(index=16384), "INVALID_FIELD", "§3.2 ChunkData"),
        ("Error code 0", pack(envelope(15, {0: 0, 1: ""})), "INVALID_FIELD", "§3.2 Error, messages §7.1"),
        ("Error message absent", pack(envelope(15, {0: 28})), "INVALID_FIELD", "§3.2 Error, messages §7.1"),
    ]
    return [{"kind": "message", "name": n, "hex": h.hex(), "error": e, "rule": r} for n, h, e, r in cases]


# ----------------------------------------------------------------------------- provider records

PROVIDER_KEYS = {"format": 0, "manifest_hash": 1, "ranges": 2, "addrs": 3}


def fields_to_provider(fields: dict) -> ProviderRecord:
    return ProviderRecord(manifest_hash=bytes.fromhex(fields["manifest_hash"]), ranges=tuple(fields["ranges"]),
                          addrs=tuple(fields.get("addrs", ())))


def provider_to_fields(record: ProviderRecord) -> dict:
    fields: dict[str, Any] = {"format": 1, "manifest_hash": record.manifest_hash.hex(), "ranges": list(record.ranges)}
    if record.addrs:
        fields["addrs"] = list(record.addrs)
    return fields


def provider_body(fields: dict) -> dict:
    body = {}
    for name, value in fields.items():
        body[PROVIDER_KEYS[name]] = bytes.fromhex(value) if name == "manifest_hash" else value
    return dict(sorted(body.items()))


BASE_PROVIDER = {"format": 1, "manifest_hash": HASH.hex(), "ranges": [0, 4], "addrs": [ADDR]}


def valid_providers() -> list[dict]:
    cases = [
        ("provider of parts 0-3 with an address", dict(BASE_PROVIDER)),
        ("provider of several ranges, no address", {"format": 1, "manifest_hash": HASH.hex(),
                                                    "ranges": [0, 2, 3, 5, 1024, 1026]}),
        ("provider of 32 ranges and 8 addresses", {"format": 1, "manifest_hash": HASH.hex(),
                                                   "ranges": [x for i in range(32) for x in (2 * i, 2 * i + 1)],
                                                   "addrs": [f"/ip4/10.0.0.{i}/tcp/31337" for i in range(1, 9)]}),
    ]
    out = []
    for name, fields in cases:
        data = encode_provider(fields_to_provider(fields))
        assert data == pack(provider_body(fields)), name
        out.append({"kind": "provider", "name": name, "fields": fields, "hex": data.hex()})
    return out


def accepted_providers() -> list[dict]:
    body = provider_body(BASE_PROVIDER)
    no_addrs = {k: v for k, v in BASE_PROVIDER.items() if k != "addrs"}
    return [
        {"kind": "provider", "name": "provider, keys in descending order", "fields": BASE_PROVIDER,
         "hex": pack(dict(reversed(list(body.items())))).hex()},
        {"kind": "provider", "name": "provider, unknown keys ignored", "fields": BASE_PROVIDER,
         "hex": pack({**body, 4: "later", 99: [1, 2]}).hex()},
        {"kind": "provider", "name": "provider, nil addrs", "fields": no_addrs,
         "hex": pack({**provider_body(no_addrs), 3: None}).hex()},
    ]


def invalid_providers() -> list[dict]:
    def rec(**changes: Any) -> bytes:
        body = provider_body(BASE_PROVIDER)
        for name, value in changes.items():
            if value is _DROP:
                body.pop(PROVIDER_KEYS[name], None)
            else:
                body[PROVIDER_KEYS[name]] = value
        return pack(dict(sorted(body.items())))

    good = rec()
    cases: list[tuple[str, bytes, str, str]] = [
        ("provider longer than 1024 bytes", rec(addrs=["/dns4/" + "h" * 240 + ".example/tcp/1"] * 5), "LIMIT_EXCEEDED", "§4.2 step 1"),
        ("provider empty", b"", "MALFORMED", "§4.2 step 2"),
        ("provider truncated", good[:-2], "MALFORMED", "§4.2 step 2"),
        ("provider trailing bytes", good + b"\x00", "MALFORMED", "§4.2 step 2"),
        ("provider with too many objects", pack({**provider_body(BASE_PROVIDER), 9: [0] * 130}), "LIMIT_EXCEEDED", "§4.2 step 2 objects"),
        ("provider nested too deep", rec(addrs=[[ADDR]]), "LIMIT_EXCEEDED", "§4.2 step 2 depth"),
        ("provider container too large", pack({0: 1, 9: list(range(300))}), "LIMIT_EXCEEDED", "§4.2 step 2 container"),
        ("provider string key", pack({**provider_body(BASE_PROVIDER), "x": 1}), "MALFORMED", "§4.2 step 3"),
        ("provider duplicate key", good[:1].replace(b"\x84", b"\x85") + good[1:] + b"\x00\x01", "MALFORMED", "§4.2 step 3"),
        ("provider not a map", pack([1, HASH, [0, 4]]), "MALFORMED", "§4.2 step 3"),
        ("provider format absent", rec(format=_DROP), "MALFORMED", "§4.2 step 4"),
        ("provider format a string", rec(format="1"), "MALFORMED", "§4.2 step 4"),
        ("provider format 2", rec(format=2), "UNSUPPORTED_VERSION", "§4.2 step 4"),
        ("provider manifest_hash absent", rec(manifest_hash=_DROP), "INVALID_FIELD", "§4.1 manifest_hash"),
        ("provider manifest_hash of 31 bytes", rec(manifest_hash=HASH[:31]), "INVALID_FIELD", "§4.1 manifest_hash"),
        ("provider ranges absent", rec(ranges=_DROP), "INVALID_FIELD", "§4.1 ranges"),
        ("provider ranges empty", rec(ranges=[]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider ranges odd", rec(ranges=[0, 4, 6]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider range empty", rec(ranges=[3, 3]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider range reversed", rec(ranges=[4, 0]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider ranges descending", rec(ranges=[5, 6, 0, 2]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider ranges overlapping", rec(ranges=[0, 4, 3, 6]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider ranges touching", rec(ranges=[0, 2, 2, 4]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider range end 1027", rec(ranges=[0, 1027]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider range negative", rec(ranges=[-1, 2]), "INVALID_FIELD", "§4.1 ranges"),
        ("provider 33 ranges", rec(ranges=[x for i in range(33) for x in (2 * i, 2 * i + 1)]), "LIMIT_EXCEEDED", "§4.1 ranges"),
        ("provider ranges not an array", rec(ranges=4), "INVALID_FIELD", "§4.1 ranges"),
        ("provider nine addrs", rec(addrs=["/ip4/10.0.0.1/tcp/1"] * 9), "LIMIT_EXCEEDED", "§4.1 addrs"),
        ("provider addr empty", rec(addrs=[""]), "INVALID_FIELD", "§4.1 addrs"),
        ("provider addr not a str", rec(addrs=[1]), "INVALID_FIELD", "§4.1 addrs"),
    ]
    return [{"kind": "provider", "name": n, "hex": h.hex(), "error": e, "rule": r} for n, h, e, r in cases]


# ----------------------------------------------------------------------------- file


def generate() -> dict:
    return {
        "spec": "spec/weights.md",
        "revision": 1,
        "description": "Weights from the swarm (spec/weights.md): manifests (JSON bytes, their SHA-256 and swarm "
        "name), /biopetals/weights/1 messages and weights-provider DHT record values; valid canonical bytes, "
        "accepted non-canonical ones, and invalid ones with the error code of the first rule broken. 'kind' says "
        "which decoder reads each vector.",
        "valid": valid_manifests() + valid_messages() + valid_providers(),
        "accepted": accepted_manifests() + accepted_messages() + accepted_providers(),
        "invalid": invalid_manifests() + invalid_messages() + invalid_providers(),
    }


def main() -> int:
    text = json.dumps(generate(), indent=1, ensure_ascii=False) + "\n"
    if "--check" in sys.argv:
        return 0 if OUT.exists() and OUT.read_text() == text else 1
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
