"""PartFiles: partial files, resume by re-hashing, finished parts readable by the checkpoint reader."""

from __future__ import annotations

import pytest
import torch

from support_models import make_tiny_checkpoint

from biopetals.models.checkpoint import load_block_state
from biopetals.protocol.manifest import MANIFEST_FILE, MiB, parse_manifest
from biopetals.weights.build import build_manifest
from biopetals.weights.local import LocalWeights
from biopetals.weights.store import DirectoryMismatch, PartFiles


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("s") / "tiny", num_layers=2, hidden_size=256,
                                intermediate_size=1024, max_shard_size="2MB")
    (path / MANIFEST_FILE).write_bytes(build_manifest(path, chunk_size=MiB))
    return path, parse_manifest((path / MANIFEST_FILE).read_bytes())


def test_resume_keeps_only_verified_chunks(source, tmp_path):
    path, manifest = source
    seed = LocalWeights(manifest, path)
    assert seed.held == [0, 1, 2, 3]
    n = len(manifest.parts[1].chunks)
    assert n >= 3
    files = PartFiles(manifest, tmp_path / "out")
    assert files.resume(1) == list(range(n))
    files.write(1, 0, seed.read_chunk(1, 0))
    files.write(1, n - 1, seed.read_chunk(1, n - 1))
    garbage = bytearray(seed.read_chunk(1, 1))
    garbage[7] ^= 1
    files.write(1, 1, bytes(garbage))  # e.g. a write cut short by kill -9, or a bug
    # a new process: only the two good chunks are kept
    again = PartFiles(manifest, tmp_path / "out")
    assert again.resume(1) == list(range(1, n - 1))
    for index in range(1, n - 1):
        again.write(1, index, seed.read_chunk(1, index))
    again.finish(1)
    assert not list((tmp_path / "out").glob("*.partial"))
    fetched = LocalWeights(manifest, tmp_path / "out")
    assert fetched.held == [1]
    got, want = load_block_state(tmp_path / "out", 1), load_block_state(path, 1)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_files_part_is_cut_into_its_files(source, tmp_path):
    path, manifest = source
    seed = LocalWeights(manifest, path)
    files = PartFiles(manifest, tmp_path / "out")
    part = manifest.files_part
    for index in files.resume(part):
        files.write(part, index, seed.read_chunk(part, index))
    files.finish(part)
    for entry in manifest.parts[part].files:
        assert (tmp_path / "out" / entry.name).read_bytes() == (path / entry.name).read_bytes()


def test_a_directory_of_another_model_is_refused(source, tmp_path):
    path, manifest = source
    other = make_tiny_checkpoint(tmp_path / "other", num_layers=2, seed=1)
    (other / MANIFEST_FILE).write_bytes(build_manifest(other, chunk_size=MiB))
    with pytest.raises(DirectoryMismatch, match="choose another directory"):
        PartFiles(manifest, other)
    with pytest.raises(ValueError, match="bytes, expected"):
        files = PartFiles(manifest, tmp_path / "out")
        files.resume(0)
        files.write(0, 0, b"short")


def test_a_directory_with_only_the_manifest_becomes_a_checkpoint(source, tmp_path):
    from biopetals.models.config import load_config, model_info
    from biopetals.weights.source import resolve_source

    path, manifest = source
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / MANIFEST_FILE).write_bytes(manifest.raw)
    resolved = resolve_source(bare)
    assert resolved.directory == bare and resolved.manifest.raw == manifest.raw
    assert resolved.missing([0, 1, manifest.client_part]) == [0, 1, manifest.client_part]
    config, _ = load_config(bare)  # config.json written from the manifest
    assert config.num_hidden_layers == 2 and model_info(bare).dht_prefix == manifest.swarm_name
    # a manifest file elsewhere: the weights go to the directory given
    other = resolve_source(path / MANIFEST_FILE, tmp_path / "w")
    assert other.directory == tmp_path / "w" and (tmp_path / "w" / "config.json").is_file()
    # the source checkpoint itself holds everything
    assert resolve_source(path).missing(list(range(len(manifest.parts)))) == []
