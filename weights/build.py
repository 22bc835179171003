"""``build_manifest``: cut a checkpoint directory into parts and hashed chunks (spec/weights.md §2).

Reads every tensor's bytes once, straight from the safetensors files (no torch), in the
order of the manifest's parts, hashing each ``chunk_size`` slice with SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from biopetals.models.checkpoint import CheckpointIndex
from biopetals.models.config import check_architecture, load_config, model_info
from biopetals.protocol.manifest import DEFAULT_CHUNK_SIZE, MANIFEST_FORMAT, encode_manifest

from .safetensors_files import TensorLocation, read_header

__all__ = ["build_manifest", "CLIENT_FILES"]

#: Files of a checkpoint directory that a client needs besides the tensors (the ``files`` part).
CLIENT_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)
_READ = 1 << 20


def _locations(directory: Path, index: CheckpointIndex) -> dict[str, tuple[Path, TensorLocation]]:
    out = {}
    for shard in sorted(set(index.weight_map.values())):
        for name, loc in read_header(directory / shard).items():
            if index.weight_map.get(name) == shard:
                out[name] = (directory / shard, loc)
    missing = set(index.weight_map) - set(out)
    if missing:
        raise ValueError(f"{directory}: tensors listed in the index but not in their shard: {sorted(missing)[:5]}")
    return out


def _byte_stream(pieces: list[tuple[Path, int, int]]) -> Iterator[bytes]:
    """The bytes of ``pieces`` (file, start, end), one after another, in reads of ~1 MiB."""
    for path, start, end in pieces:
        with open(path, "rb") as f:
            f.seek(start)
            left = end - start
            while left:
                block = f.read(min(_READ, left))
                if not block:
                    raise ValueError(f"{path}: ends before byte {end}")
                left -= len(block)
                yield block


def _chunk_hashes(stream: Iterator[bytes], chunk_size: int, done: Callable[[int], None]) -> list[str]:
    hashes: list[str] = []
    h, filled = hashlib.sha256(), 0
    for block in stream:
        view = memoryview(block)
        while view:
            take = min(len(view), chunk_size - filled)
            h.update(view[:take])
            filled += take
            view = view[take:]
            if filled == chunk_size:
                hashes.append(h.hexdigest())
                h, filled = hashlib.sha256(), 0
        done(len(block))
    if filled:
        hashes.append(h.hexdigest())
    return hashes


def build_manifest(directory: str | os.PathLike, *, chunk_size: int = DEFAULT_CHUNK_SIZE, name: str | None = None,
                   progress: Callable[[int], None] = lambda n: None) -> bytes:
    """The manifest of a checkpoint directory, as canonical bytes.

    ``name``: the model's name in the swarm name (default: the checkpoint's usual name,
    models/config.py). ``progress(n)`` is told every ``n`` bytes read.
    """
    config, resolved = load_config(directory)
    spec = check_architecture(config)
    n_blocks = int(config.num_hidden_layers)
    index = CheckpointIndex(resolved)
    locations = _locations(resolved, index)
    groups: list[list[str]] = [[] for _ in range(n_blocks + 1)]
    for tensor in sorted(locations):
        part = n_blocks
        if tensor.startswith(spec.layer_prefix):
            block = tensor[len(spec.layer_prefix):].split(".", 1)[0]
            if not block.isdigit() or int(block) >= n_blocks:
                raise ValueError(f"tensor {tensor!r} names a block outside 0:{n_blocks}")
            part = int(block)
        groups[part].append(tensor)
    parts = []
    for i, names in enumerate(groups):
        entries, pieces, size = [], [], 0
        for tensor in names:
            path, loc = locations[tensor]
            entries.append({"name": tensor, "dtype": loc.dtype, "shape": list(loc.shape)})
            pieces.append((path, loc.start, loc.end))
            size += loc.end - loc.start
        parts.append({"name": f"block.{i}" if i < n_blocks else "client", "tensors": entries, "size": size,
                      "chunks": _chunk_hashes(_byte_stream(pieces), chunk_size, progress)})
    files = [f for f in CLIENT_FILES if (resolved / f).is_file()]
    pieces = [(resolved / f, 0, (resolved / f).stat().st_size) for f in files]
    parts.append({"name": "files", "files": [{"name": f, "size": end} for f, (_, _, end) in zip(files, pieces)],
                  "size": sum(end for _, _, end in pieces),
                  "chunks": _chunk_hashes(_byte_stream(pieces), chunk_size, progress)})
    document = {
        "format": MANIFEST_FORMAT,
        "name": name or model_info(resolved, config).name,
        "architecture": spec.architecture,
        "num_blocks": n_blocks,
        "chunk_size": chunk_size,
        "config": json.loads((resolved / "config.json").read_text()),
        "parts": parts,
    }
    return encode_manifest(document)


def checkpoint_bytes(directory: str | os.PathLike) -> int:
    """Bytes of tensor data a manifest of ``directory`` would cover (for a progress bar's total)."""
    _, resolved = load_config(directory)
    index = CheckpointIndex(resolved)
    total = sum(loc.end - loc.start for _, loc in _locations(resolved, index).values())
    return total + sum((resolved / f).stat().st_size for f in CLIENT_FILES if (resolved / f).is_file())
