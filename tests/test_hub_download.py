"""Models from the hub (issue 24, item 2): only the files a node or a client computes with.

No internet: tests/support_hub.py serves a real sharded tiny checkpoint (15 shards, one
or two per block) on 127.0.0.1 the way the hub's HTTP file API does, and huggingface_hub's
own client downloads from it (``HF_ENDPOINT`` for a node process, ``endpoint=`` here). Each
test asserts which files were requested.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from support_hub import LocalHub
from support_models import make_tiny_checkpoint
from support_swarm import NODE_COMMAND, Swarm

from biopetals.models.config import ModelConfigError, model_info
from biopetals.models.hub import HubCheckpoint, is_hub_name

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hub") / "tiny")


def shards_with(checkpoint, predicate) -> list[str]:
    wmap = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    return sorted({shard for name, shard in wmap.items() if predicate(name)})


def blocks(start, end):
    return lambda name: any(name.startswith(f"model.layers.{i}.") for i in range(start, end))


def client_tensors(name):
    return name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def test_a_node_and_a_client_download_only_their_shards(checkpoint, tmp_path):
    with LocalHub({"org/tiny": checkpoint}) as hub:
        node = HubCheckpoint("org/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache", progress=False)
        node.fetch_blocks(2, 4)
        want = shards_with(checkpoint, blocks(2, 4))
        assert len(want) < 15 // 2  # the test means something: most shards are not needed
        assert hub.files() == ["config.json", "model.safetensors.index.json", *want]
        assert node.directory.parts[-3:-1] == ("models--org--tiny", "snapshots")
        hub.requests.clear()
        client = HubCheckpoint("org/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache", progress=False)
        client.fetch_client()
        want = shards_with(checkpoint, client_tensors)
        got = hub.files()
        assert "config.json" not in got  # cached: asked about (HEAD), not downloaded again
        assert [f for f in got if f.endswith(".safetensors")] == want
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(got)
        assert "special_tokens_map.json" in hub.files("HEAD")  # tried, absent from the repo, skipped
    assert model_info(client.directory).dht_prefix.startswith("org-tiny.")


def test_revision_gated_models_and_missing_repos(checkpoint, tmp_path, monkeypatch):
    with LocalHub({"org/tiny": checkpoint, "lab/gated": checkpoint}, gated={"lab/gated": "hf_secret"}) as hub:
        HubCheckpoint("org/tiny", revision="v1.0", endpoint=hub.url, cache_dir=tmp_path / "c1", progress=False)
        assert {r for _, _, r, _ in hub.requests} == {"v1.0"}
        with pytest.raises(ModelConfigError, match="gated model.*HF_TOKEN"):
            HubCheckpoint("lab/gated", endpoint=hub.url, cache_dir=tmp_path / "c2", progress=False, token=False)
        monkeypatch.setenv("HF_TOKEN", "hf_secret")  # the user's token, as huggingface_hub finds it
        gated = HubCheckpoint("lab/gated", endpoint=hub.url, cache_dir=tmp_path / "c3", progress=False)
        assert (gated.directory / "config.json").is_file()
        with pytest.raises(ModelConfigError, match="not a model the hub lets us read"):
            HubCheckpoint("org/nothing", endpoint=hub.url, cache_dir=tmp_path / "c4", progress=False)
    assert is_hub_name("org/tiny") and not is_hub_name(str(checkpoint)) and not is_hub_name("m.0123456789abcdef")


def test_biopetals_node_serves_blocks_downloaded_from_the_hub(checkpoint, tmp_path):
    with LocalHub({"org/tiny": checkpoint}) as hub, Swarm(tmp_path) as swarm:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_TOKEN": ""}
        node = swarm.start_node("org/tiny", "2:4", "--no-benchmark", "--revision", "main", env=env, timeout=120)
        output = node.output()
        assert hub.files() == ["config.json", "model.safetensors.index.json", *shards_with(checkpoint, blocks(2, 4))]
        assert "downloading from the hub: org/tiny (revision main)" in output
        snapshot = next((tmp_path / "cache" / "models--org--tiny" / "snapshots").iterdir())
        assert f"model {model_info(snapshot).dht_prefix} (LlamaForCausalLM), blocks 2:4 of 8" in output
