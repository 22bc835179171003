"""``LocalWeights``: the parts of a manifest that a directory holds, and verified chunk reads.

A directory holds a tensor part when its safetensors index (or single file) lists every
tensor of the part with the manifest's dtype and shape; it holds the ``files`` part when
every file is there with the listed size. Which file and offset a tensor came from does
not matter: the original shards of ``biopetals-manifest``'s input and the per-part files
of a fetch are read the same way.

A chunk is hashed before it is first served (``read_chunk``): a copy that went bad on
disk is reported and never spread. SHA-256 costs ~2 ms per 4 MiB chunk here (see the
benchmark), less than sending it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from biopetals.models.checkpoint import INDEX_FILE, SINGLE_FILE
from biopetals.protocol.manifest import Manifest, Part

from .safetensors_files import SafetensorsError, TensorLocation, read_header

__all__ = ["LocalWeights", "CorruptCopy", "tensor_locations"]

log = logging.getLogger("biopetals.weights")


class CorruptCopy(Exception):
    """A chunk read from this machine's disk does not match the manifest's hash."""


def tensor_locations(directory: Path) -> dict[str, tuple[Path, TensorLocation]]:
    """Every tensor of a directory's safetensors files: name -> (file, where its bytes are)."""
    index_file = directory / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}
    elif (directory / SINGLE_FILE).is_file():
        weight_map, shards = None, [SINGLE_FILE]
    else:
        return {}
    out = {}
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            continue
        try:
            header = read_header(path)
        except (OSError, SafetensorsError) as exc:
            log.warning("ignoring %s: %s", path, exc)
            continue
        for name, loc in header.items():
            if weight_map is None or weight_map.get(name) == shard:
                out[name] = (path, loc)
    return out


def _pread(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise CorruptCopy(f"{path}: short read")
    return data


class LocalWeights:
    """Chunks of ``manifest`` read from ``directory`` (thread-safe; reads run on worker threads)."""

    def __init__(self, manifest: Manifest, directory: str | os.PathLike) -> None:
        self.manifest = manifest
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._verified: set[tuple[int, int]] = set()
        self._corrupt: set[int] = set()
        self.refresh()

    def refresh(self) -> None:
        """Re-read which parts the directory holds (after a fetch added some)."""
        locations = tensor_locations(self.directory)
        pieces: dict[int, list[tuple[Path, int, int, int]]] = {}  # part -> (file, file start, part start, length)
        for part in self.manifest.parts:
            found = self._pieces(part, locations)
            if found is not None:
                pieces[part.index] = found
        with self._lock:
            self._pieces_by_part = pieces

    def _pieces(self, part: Part, locations: dict) -> list[tuple[Path, int, int, int]] | None:
        if part.files:
            out = []
            for f in part.files:
                path = self.directory / f.name
                try:
                    if path.stat().st_size != f.size:
                        return None
                except OSError:
                    return None
                out.append((path, 0, f.offset, f.size))
            return out
        if not part.tensors:
            return []
        out = []
        for t in part.tensors:
            found = locations.get(t.name)
            if found is None:
                return None
            path, loc = found
            if loc.dtype != t.dtype or loc.shape != t.shape or loc.end - loc.start != t.size:
                log.warning("%s: %s is %s %s, the manifest says %s %s", path, t.name, loc.dtype, loc.shape,
                            t.dtype, t.shape)
                return None
            out.append((path, loc.start, t.offset, t.size))
        return out

    @property
    def held(self) -> list[int]:
        """Indices of the parts this directory holds (minus any found corrupt)."""
        with self._lock:
            return sorted(set(self._pieces_by_part) - self._corrupt)

    def holds(self, part: int) -> bool:
        with self._lock:
            return part in self._pieces_by_part and part not in self._corrupt

    def _drop(self, part: int, why: str) -> None:
        """Stop offering ``part`` (served ``NOT_HELD``, left out of the provider record)."""
        with self._lock:
            self._corrupt.add(part)
        log.error("local copy of part %s (%s): %s; no longer served", self.manifest.parts[part].name,
                  self.directory, why)

    def verify(self, parts: list[int], progress: Callable[[int], None] = lambda n: None) -> None:
        """Hash every chunk of ``parts`` (those already verified are skipped). Raises ``CorruptCopy``
        naming the first chunk that does not match, or ``KeyError`` for a part not held."""
        for part in parts:
            for index in range(len(self.manifest.parts[part].chunks)):
                with self._lock:
                    done = (part, index) in self._verified
                if not done:
                    start, end = self.manifest.chunk_range(part, index)
                    self.read_chunk(part, index)
                    progress(end - start)

    def read_chunk(self, part: int, index: int) -> bytes:
        """The bytes of one chunk, hashed on first read. Raises ``KeyError`` if the part is not
        held, ``ValueError`` for an index outside the part, ``CorruptCopy`` on a hash mismatch or
        a file that can no longer be read (the part is then no longer offered)."""
        start, end = self.manifest.chunk_range(part, index)
        with self._lock:
            if part in self._corrupt or part not in self._pieces_by_part:
                raise KeyError(part)
            pieces = self._pieces_by_part[part]
            verified = (part, index) in self._verified
        spans: list[tuple[Path, int, int, int]] = []  # (file, offset, part start, part end)
        for path, file_start, part_start, length in pieces:
            lo, hi = max(start, part_start), min(end, part_start + length)
            if lo >= hi:
                continue
            offset = file_start + lo - part_start
            if spans and spans[-1][0] == path and spans[-1][1] + spans[-1][3] - spans[-1][2] == offset:
                spans[-1] = (path, spans[-1][1], spans[-1][2], hi)  # adjacent in the same file: one read
            else:
                spans.append((path, offset, lo, hi))
        try:
            if len(spans) == 1:  # the usual case (a chunk inside one tensor): one read, no copy
                path, offset, lo, hi = spans[0]
                data = _pread(path, offset, hi - lo)
            else:
                joined = bytearray(end - start)
                for path, offset, lo, hi in spans:
                    joined[lo - start:hi - start] = _pread(path, offset, hi - lo)
                data = bytes(joined)
        except (OSError, CorruptCopy) as exc:  # a file removed or cut short since the start
            self._drop(part, f"cannot read chunk {index}: {exc}")
            raise CorruptCopy(f"part {part} chunk {index}: {exc}") from None
        if not verified:
            if hashlib.sha256(data).digest() != self.manifest.parts[part].chunks[index]:
                self._drop(part, f"chunk {index} does not match the manifest")
                raise CorruptCopy(f"part {part} chunk {index}: hash mismatch")
            with self._lock:
                self._verified.add((part, index))
        return data
