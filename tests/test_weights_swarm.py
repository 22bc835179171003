"""Weights from the swarm, end to end on real processes (spec/weights.md).

Three seed nodes start from a checkpoint directory with a manifest (``biopetals-manifest``);
each serves only block 0 but holds, hence provides, every part. Then:

- a fourth node started from the manifest file alone fetches blocks 1:4 from the seeds,
  serves them, and becomes a provider of them itself; a client started from the swarm
  name alone fetches its embeddings/head/tokenizer and its greedy output through the
  fourth node equals transformers run locally on the original checkpoint;
- a node that serves corrupted chunks (tests/broken_node.py) is detected and avoided,
  and the fetch still completes, byte-exact, from the honest peers;
- a ``biopetals-fetch`` killed with SIGKILL mid-download resumes and fetches only the
  chunks that were not verified on disk.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support_models import checkpoint_tensors, make_tiny_checkpoint
from support_swarm import Swarm

from biopetals.protocol.manifest import MANIFEST_FILE, parse_manifest

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts installed beside this Python
REPORT = re.compile(r"fetched (\d+) chunks .* from (\d+) peers; (\d+) of (\d+) chunks already verified on disk; "
                    r"(\d+) bad chunks")


def _checkpoint(path: Path) -> tuple[Path, str]:
    """4 blocks of ~4 MB (4 chunks of 1 MiB each), with a manifest; returns (dir, swarm name)."""
    make_tiny_checkpoint(path, num_layers=4, hidden_size=256, intermediate_size=1024, max_shard_size="3MB")
    out = subprocess.run([BIN / "biopetals-manifest", "--no-progress", "--chunk-mib", "1", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    name = re.search(r"swarm name: (\S+)", out.stdout)[1]
    return path, name


def _fetch_command(swarm: Swarm, model: str, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "biopetals-fetch"), model, "--out", str(out), "--swarm-key", str(swarm.key_path), "--initial-peers", *swarm.initial_peers[:1],
            "--no-progress", *extra]


def _assert_same_tensors(fetched: Path, original: Path, prefix_filter) -> int:
    got, want = checkpoint_tensors(fetched), checkpoint_tensors(original)
    names = [n for n in want if prefix_filter(n)]
    assert names and all(n in got for n in names)
    for n in names:
        assert torch.equal(got[n], want[n]), n
    return len(names)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """(swarm, checkpoint dir, swarm name): three seeds serving block 0 and providing every part."""
    tmp = tmp_path_factory.mktemp("weights-swarm")
    checkpoint, name = _checkpoint(tmp / "ckpt")
    with Swarm(tmp) as swarm:
        swarm.start_node(checkpoint, "0:1", "--no-benchmark")
        spawned = [swarm.spawn_node(checkpoint, "--blocks", "0:1", "--no-benchmark") for _ in range(2)]
        for node in spawned:
            swarm.wait_ready(node)
        yield swarm, checkpoint, name


def test_manifest_cli_names_the_swarm_by_the_manifest_hash(seeded):
    swarm, checkpoint, name = seeded
    manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
    assert name == manifest.swarm_name == f"ckpt.{manifest.hash.hex()[:16]}"
    assert all(f"model {name} " in node.output() for node in swarm.nodes[:3])  # the seeds announce under it


def test_fourth_node_fetches_its_span_and_serves_it(seeded, tmp_path):
    swarm, checkpoint, name = seeded
    fourth = swarm.start_node(checkpoint / MANIFEST_FILE, "1:4", "--weights-dir", str(tmp_path / "node4"),
                              "--no-benchmark")
    report = REPORT.search(fourth.output())
    assert report, fourth.output()
    fetched, peers, on_disk, total, bad = map(int, report.groups())
    manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
    chunks = sum(len(manifest.parts[i].chunks) for i in (1, 2, 3))
    assert chunks >= 9 and (fetched, on_disk, total, bad) == (chunks, 0, chunks, 0)  # nothing was on disk
    assert peers >= 2  # in parallel from several seeds
    assert _assert_same_tensors(tmp_path / "node4", checkpoint, lambda n: n.startswith(("model.layers.1.", "model.layers.2.", "model.layers.3."))) == 27
    assert f"model {name} " in fourth.output()
    status = subprocess.run([BIN / "biopetals-swarm", "--model", str(checkpoint / MANIFEST_FILE), "--swarm-key",
                             str(swarm.key_path), "--initial-peers", swarm.initial_peers[0]],
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr  # every block served: 0 by the seeds, 1:4 by it
    assert fourth.peer_id in status.stdout

    # the fourth node now provides blocks 1:4 itself: ask it alone for every chunk of block 3
    from biopetals.dht.node import DHT
    from biopetals.protocol.identity import Identity, PeerId
    from biopetals.protocol.weights import ChunkData, GetChunk
    from biopetals.transport.host import Host
    from biopetals.weights.fetch import _ask, find_providers

    async def ask_fourth():
        async with Host(Identity.generate(), swarm_key=swarm.swarm_key) as host:
            async with DHT(host, initial_peers=swarm.initial_peers[:1], client_mode=True) as dht:
                deadline = time.monotonic() + 30
                while True:
                    providers = await find_providers(dht, host, manifest.hash, name)
                    mine = providers.get(PeerId.from_base58(fourth.peer_id))
                    if mine is not None and mine.parts() == [1, 2, 3] or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                assert mine is not None and mine.parts() == [1, 2, 3], providers
                import hashlib

                for index, digest in enumerate(manifest.parts[3].chunks):
                    reply = await _ask(host, fourth.addr, GetChunk(manifest_hash=manifest.hash, part=3, index=index), 30)
                    assert isinstance(reply, ChunkData) and hashlib.sha256(reply.data).digest() == digest

    asyncio.run(ask_fourth())

    # a client that has nothing but the swarm name: its parts come from the swarm, its
    # tokens through the fourth node (the only one serving blocks 1:4)
    from transformers import AutoModelForCausalLM

    from biopetals.client.model import DistributedLlamaForCausalLM

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).generate(ids, max_new_tokens=8, do_sample=False)
    with DistributedLlamaForCausalLM.from_pretrained(name, weights_dir=tmp_path / "client",
                                                     initial_peers=swarm.initial_peers, swarm_key=swarm.key_path,
                                                     codec="f32") as model:
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, reference)
    assert {p.name for p in (tmp_path / "client").iterdir()} >= {"client.safetensors", "tokenizer.json", "config.json"}
    assert not any(p.name.startswith("block-") for p in (tmp_path / "client").iterdir())  # only the client's parts
    fourth.stop()

    # a later start from the fetched directory is an ordinary start: nothing fetched, same name
    again = swarm.start_node(tmp_path / "node4", "1:4", "--no-benchmark")
    assert f"model {name} " in again.output() and "fetched" not in again.output()
    again.stop()


def test_corrupting_peer_is_detected_and_avoided(seeded, tmp_path):
    swarm, checkpoint, name = seeded
    args = ["--model", str(checkpoint), "--blocks", "0:1", "--swarm-key", str(swarm.key_path), "--host", "127.0.0.1",
            "--port", "0", "--no-progress", "--no-benchmark", "--initial-peers", swarm.initial_peers[0]]
    liar = swarm._spawn([sys.executable, str(ROOT / "tests/broken_node.py"), *args], args,
                        {"BIOPETALS_BROKEN": "corrupt-chunks"})
    swarm.wait_ready(liar)
    try:
        out = subprocess.run(_fetch_command(swarm, name, tmp_path / "w", "--all", "-v"), capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0, out.stderr
        fetched, peers, on_disk, total, bad = map(int, REPORT.search(out.stdout).groups())
        assert bad >= 1 and fetched == total
        assert f"avoided {liar.peer_id}" in out.stdout
        assert f"peer {liar.peer_id} sent a corrupted chunk" in out.stderr
        assert _assert_same_tensors(tmp_path / "w", checkpoint, lambda n: True) == 39
        assert (tmp_path / "w" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    finally:
        liar.kill()


def test_a_choosing_node_fetches_only_the_blocks_it_chooses(seeded, tmp_path):
    """--num-blocks from the manifest alone, with the start-up benchmark: it measures a block with
    random weights instead of fetching one it may not serve, then fetches just its span."""
    swarm, checkpoint, name = seeded
    node = swarm.wait_ready(swarm.spawn_node(checkpoint / MANIFEST_FILE, "--num-blocks", "2", "--weights-dir",
                                             str(tmp_path / "w"), "--balance-interval", "600"), timeout=120)
    start, end = map(int, re.search(r"blocks (\d+):(\d+) of 4", node.output()).groups())
    manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
    fetched = sum(int(n) for n in re.findall(r"fetched (\d+) chunks", node.output()))
    assert fetched == sum(len(manifest.parts[b].chunks) for b in range(start, end))
    assert sorted(p.name for p in (tmp_path / "w").glob("block-*")) == [
        f"block-{b:05d}.safetensors" for b in range(start, end)]
    node.stop()


def test_killed_fetch_resumes_without_refetching(tmp_path):
    checkpoint, name = _checkpoint(tmp_path / "ckpt")
    with Swarm(tmp_path) as swarm:
        swarm.start_node(checkpoint, "0:1", "--no-benchmark", "--weights-rate", "2")  # 2 MB/s: ~8 s for 16 MB
        out_dir = tmp_path / "fetched"
        log = open(tmp_path / "fetch1.log", "wb")
        first = subprocess.Popen(_fetch_command(swarm, name, out_dir, "--blocks", "0:4"), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not list(out_dir.glob("*.partial")) and time.monotonic() < deadline:
                assert first.poll() is None, (tmp_path / "fetch1.log").read_text()
                time.sleep(0.1)
            time.sleep(3.0)  # the first ~2 MB come at once (a full bucket), then 2 MB/s
            assert first.poll() is None, "the fetch ended before it could be killed"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
            log.close()
        second = subprocess.run(_fetch_command(swarm, name, out_dir, "--blocks", "0:4"), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 0, second.stderr
        fetched, peers, on_disk, total, bad = map(int, REPORT.search(second.stdout).groups())
        manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
        assert total == sum(len(manifest.parts[i].chunks) for i in range(4)) and 0 < on_disk < total
        assert fetched == total - on_disk  # not one verified chunk fetched twice
        assert not list(out_dir.glob("*.partial"))
        assert _assert_same_tensors(out_dir, checkpoint, lambda n: n.startswith("model.layers.")) == 36


def test_a_node_refuses_weights_that_differ_from_its_manifest(seeded, tmp_path):
    swarm, checkpoint, name = seeded
    import shutil

    from biopetals.weights.local import tensor_locations

    copy = shutil.copytree(checkpoint, tmp_path / "ckpt")  # same directory name: same swarm name
    manifest = parse_manifest((copy / MANIFEST_FILE).read_bytes())
    path, loc = tensor_locations(copy)[manifest.parts[2].tensors[0].name]
    with open(path, "r+b") as f:  # one bit of block 2, as a disk or a bad copy would do it
        f.seek(loc.start + 5)
        byte = f.read(1)
        f.seek(loc.start + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    node = swarm.spawn_node(copy, "--blocks", "1:3", "--no-benchmark")
    assert node.process.wait(90) == 1
    assert "do not match its manifest" in node.output() and "READY" not in node.output()
