"""build_manifest against the checkpoint's own bytes, and the swarm name it gives (spec/weights.md §2)."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from support_models import checkpoint_tensors, make_tiny_checkpoint

from biopetals.models.config import ModelConfigError, model_info
from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.manifest import MANIFEST_FILE, MiB, parse_manifest
from biopetals.weights.build import build_manifest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", num_layers=3, hidden_size=192,
                                intermediate_size=640, max_shard_size="1MB")


def test_build_manifest_matches_checkpoint_bytes(checkpoint):
    manifest = parse_manifest(build_manifest(checkpoint, chunk_size=MiB))
    tensors = checkpoint_tensors(checkpoint)
    assert manifest.num_blocks == 3 and len(manifest.parts) == 5 and manifest.chunk_size == MiB
    listed = [t.name for part in manifest.parts for t in part.tensors]
    assert sorted(listed) == sorted(tensors)  # every tensor once
    for i in range(3):
        assert {t.name for t in manifest.parts[i].tensors} == {n for n in tensors if n.startswith(f"model.layers.{i}.")}
    assert {t.name for t in manifest.parts[3].tensors} == {"model.embed_tokens.weight", "model.norm.weight",
                                                           "lm_head.weight"}
    for part in manifest.parts[:4]:
        # the part's bytes, rebuilt from torch's view of the tensors (not from the files' offsets)
        stream = b"".join(tensors[t.name].contiguous().numpy().tobytes() for t in part.tensors)
        assert len(stream) == part.size
        assert list(part.chunks) == [hashlib.sha256(stream[i:i + MiB]).digest() for i in range(0, len(stream), MiB)]
        for t in part.tensors:
            assert t.dtype == "F32" and t.shape == tuple(tensors[t.name].shape)
    files = manifest.parts[4]
    stream = b"".join((checkpoint / f.name).read_bytes() for f in files.files)
    assert {f.name for f in files.files} >= {"tokenizer.json", "generation_config.json"}
    assert files.chunks == tuple(hashlib.sha256(stream[i:i + MiB]).digest() for i in range(0, len(stream), MiB))
    assert manifest.config == json.loads((checkpoint / "config.json").read_text())


def test_swarm_name_follows_the_manifest_and_changes_with_one_weight(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / "tiny")
    before = model_info(copy).dht_prefix  # no manifest: name + config fingerprint
    (copy / MANIFEST_FILE).write_bytes(build_manifest(copy, chunk_size=MiB))
    manifest = parse_manifest((copy / MANIFEST_FILE).read_bytes())
    assert model_info(copy).dht_prefix == manifest.swarm_name == f"tiny.{manifest.hash.hex()[:16]}" != before

    # same config, one weight changed: another manifest, another name
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.torch import load_file, save_file

    shard = copy / index["model.norm.weight"]
    data = load_file(shard)
    data["model.norm.weight"] = data["model.norm.weight"] + 1.0
    save_file(data, shard, metadata={"format": "pt"})
    other = parse_manifest(build_manifest(copy, chunk_size=MiB))
    assert other.swarm_name != manifest.swarm_name and other.name == manifest.name


def test_a_manifest_that_does_not_match_the_config_is_refused(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / "tiny")
    (copy / MANIFEST_FILE).write_bytes(build_manifest(copy, chunk_size=MiB))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match="differs from the config"):
        model_info(copy)
    (copy / MANIFEST_FILE).write_bytes(b"{not json")
    with pytest.raises(ModelConfigError, match="not UTF-8 JSON"):
        model_info(copy)


def test_manifest_cli_refuses_bad_chunk_sizes_and_directories(tmp_path, capsys):
    from biopetals.weights.cli import manifest_main

    with pytest.raises(SystemExit):
        manifest_main([str(tmp_path), "--chunk-mib", "3"])
    assert "power of two" in capsys.readouterr().err
    assert manifest_main([str(tmp_path / "nowhere"), "--no-progress"]) == 1
    assert "biopetals-manifest:" in capsys.readouterr().err


def test_manifest_cli_says_that_the_swarm_name_changes_and_what_to_restart(checkpoint, tmp_path, capsys):
    from biopetals.weights.cli import manifest_main

    directory = tmp_path / "copy"
    shutil.copytree(checkpoint, directory)
    before = model_info(directory).dht_prefix
    assert manifest_main([str(directory), "--no-progress"]) == 0
    out = capsys.readouterr().out
    after = model_info(directory).dht_prefix
    assert before != after
    assert f"swarm name of {directory} changes from {before} to {after}" in out and "Restart every node" in out
    assert manifest_main([str(directory), "--no-progress"]) == 0  # the same weights again: the name stays
    assert "changes from" not in capsys.readouterr().out


def test_parse_rejects_a_changed_chunk_count(checkpoint):
    doc = json.loads(build_manifest(checkpoint, chunk_size=MiB))
    doc["parts"][0]["chunks"].append("0" * 64)
    with pytest.raises(RemoteProtocolError, match="chunk hashes"):
        parse_manifest(json.dumps(doc).encode())
