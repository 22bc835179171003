"""``PartFiles``: where fetched chunks go, how a fetch resumes, and how a part is finished.

A tensor part is fetched into ``<part file>.partial``: the safetensors header of the part
(weights/safetensors_files.py), then the part's bytes at their own offsets, so chunk ``j``
lands at ``header + j * chunk_size`` and the finished file needs no copy: it is renamed
to ``block-00012.safetensors`` (or ``client.safetensors``) and added to
``model.safetensors.index.json``. The ``files`` part goes to ``files.partial`` and is cut
into its files when complete.

Resuming needs no journal: a partial file's chunks are hashed again and those that match
the manifest are kept (~0.5 s per GB), so a download killed at any instant - even in the
middle of a write - resumes with exactly the chunks that are right on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from biopetals.models.checkpoint import INDEX_FILE, SINGLE_FILE
from biopetals.protocol.manifest import MANIFEST_FILE, Manifest, parse_manifest

from .local import LocalWeights
from .safetensors_files import SafetensorsError, header_bytes, read_header

__all__ = ["PartFiles", "prepare_directory", "part_file_name", "DirectoryMismatch"]


class DirectoryMismatch(ValueError):
    """The target directory already holds another model."""


def part_file_name(manifest: Manifest, part: int) -> str:
    return "client.safetensors" if part == manifest.client_part else f"block-{part:05d}.safetensors"


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_directory(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Create ``directory`` with the manifest and ``config.json``; refuse one that holds another model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = directory / MANIFEST_FILE
    if existing.is_file():
        if existing.read_bytes() != manifest.raw:
            try:
                other = parse_manifest(existing.read_bytes()).swarm_name
            except Exception:
                other = "an unreadable manifest"
            raise DirectoryMismatch(f"{directory} holds {other}, not {manifest.swarm_name}: choose another directory")
    config = directory / "config.json"
    if config.is_file():
        try:
            same = json.loads(config.read_text()) == manifest.config
        except ValueError:
            same = False
        if not same:
            raise DirectoryMismatch(f"{config} is not the config of {manifest.swarm_name}: choose another directory")
    else:
        _write_atomic(config, json.dumps(manifest.config, indent=2, sort_keys=True).encode())
    if not existing.is_file():
        _write_atomic(existing, manifest.raw)
    return directory


class PartFiles:
    """Partial and finished part files of one manifest in one directory."""

    def __init__(self, manifest: Manifest, directory: str | os.PathLike) -> None:
        self.manifest = manifest
        self.directory = prepare_directory(manifest, directory)
        self._data_start: dict[int, int] = {}

    def _partial(self, part: int) -> Path:
        if part == self.manifest.files_part:
            return self.directory / "files.partial"
        return self.directory / (part_file_name(self.manifest, part) + ".partial")

    def resume(self, part: int, *, progress: Callable[[int], None] = lambda n: None) -> list[int]:
        """Open (or create) part ``part``'s partial file; the chunk indices still to fetch."""
        info = self.manifest.parts[part]
        path = self._partial(part)
        header = b"" if part == self.manifest.files_part else header_bytes(info.tensors, {"format": "pt"})
        self._data_start[part] = len(header)
        total = len(header) + info.size
        if path.is_file() and path.stat().st_size == total and self._header_matches(path, header):
            missing = []
            with open(path, "rb") as f:
                for index, digest in enumerate(info.chunks):
                    start, end = self.manifest.chunk_range(part, index)
                    data = os.pread(f.fileno(), end - start, len(header) + start)
                    progress(end - start)
                    if hashlib.sha256(data).digest() != digest:
                        missing.append(index)
            return missing
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(total)  # sparse: chunks are written at their offsets
        return list(range(len(info.chunks)))

    @staticmethod
    def _header_matches(path: Path, header: bytes) -> bool:
        with open(path, "rb") as f:
            return f.read(len(header)) == header

    def write(self, part: int, index: int, data: bytes) -> None:
        start, end = self.manifest.chunk_range(part, index)
        if len(data) != end - start:
            raise ValueError(f"chunk ({part}, {index}) is {len(data)} bytes, expected {end - start}")
        fd = os.open(self._partial(part), os.O_WRONLY)
        try:
            os.pwrite(fd, data, self._data_start[part] + start)
        finally:
            os.close(fd)

    def finish(self, part: int) -> None:
        """Every chunk of ``part`` is written and verified: make it a file the checkpoint reader sees."""
        path = self._partial(part)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        if part == self.manifest.files_part:
            with open(path, "rb") as f:
                for entry in self.manifest.parts[part].files:
                    _write_atomic(self.directory / entry.name, os.pread(f.fileno(), entry.size, entry.offset))
            path.unlink()
            return
        final = self.directory / part_file_name(self.manifest, part)
        os.replace(path, final)
        self._add_to_index(final.name, [t.name for t in self.manifest.parts[part].tensors])

    def _add_to_index(self, file_name: str, tensors: list[str]) -> None:
        index_path = self.directory / INDEX_FILE
        weight_map: dict[str, str] = {}
        if index_path.is_file():
            try:
                weight_map = dict(json.loads(index_path.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError):
                weight_map = {}
        elif (self.directory / SINGLE_FILE).is_file():  # keep a single-file checkpoint's tensors visible
            try:
                weight_map = {name: SINGLE_FILE for name in read_header(self.directory / SINGLE_FILE)}
            except (OSError, SafetensorsError):
                weight_map = {}
        weight_map.update({name: file_name for name in tensors})
        body = {"metadata": {"biopetals_manifest": self.manifest.hash.hex()},
                "weight_map": dict(sorted(weight_map.items()))}
        _write_atomic(index_path, json.dumps(body, indent=2).encode())

    def local(self) -> LocalWeights:
        return LocalWeights(self.manifest, self.directory)
