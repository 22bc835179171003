"""biopetals-conformance against real peers: it passes our node and DHT, fails a broken node, survives garbage.

A node started from a checkpoint with a weights manifest passes the weights checks; one without
reports them n/a; one that serves corrupted chunks fails the chunk-hash check only.

See README.md ("Testing another implementation") and spec/README.md §5. The tool runs as
its console module in a subprocess, as another implementation's CI would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import support_swarm
from support_models import make_tiny_checkpoint
from support_swarm import Swarm

TOOL = [sys.executable, "-m", "biopetals.conformance.cli"]
BROKEN_NODE = [sys.executable, str(Path(__file__).parent / "broken_node.py")]
NODE_ARGS = ("--max-cache-tokens", "2048", "--max-session-tokens", "512", "--idle-timeout", "2", "--no-benchmark")


def conformance(key_path, addr, *extra, timeout=240):
    """Run the tool with --json; returns (exit status, {check id: result})."""
    proc = subprocess.run([*TOOL, "--swarm-key", str(key_path), "--peer", addr, "--json", *extra],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.stdout, proc.stderr
    doc = json.loads(proc.stdout)
    return proc.returncode, {r["id"]: r for r in doc["results"]}


def conformance_here(capsys, key_path, addr, *extra):
    """The same, in this process (saves a Python start-up where the CLI itself is not the point)."""
    from biopetals.conformance.cli import main

    status = main(["--swarm-key", str(key_path), "--peer", addr, "--json", *extra])
    return status, {r["id"]: r for r in json.loads(capsys.readouterr().out)["results"]}


def failures(results):
    return {k: f"{r['detail']} | sent {r['sent'][:80]} | received {r['received'][:120]}" for k, r in results.items() if r["outcome"] == "fail"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_tokenizer=False)


@pytest.fixture(scope="module")
def manifest_ckpt(tmp_path_factory):
    """A tiny checkpoint with a biopetals-manifest.json (1 MiB chunks): its nodes serve /biopetals/weights/1."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-weights", with_tokenizer=False)
    out = subprocess.run([str(Path(sys.executable).parent / "biopetals-manifest"), str(path), "--chunk-mib", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return path


def test_every_check_passes_against_our_node(tmp_path, ckpt):
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(ckpt, "0:2", *NODE_ARGS)
        status, results = conformance(swarm.key_path, node.addr)
    assert failures(results) == {}
    assert status == 0
    not_applicable = {k for k, r in results.items() if r["outcome"] != "pass"}
    weights = {k for k in results if k.startswith("weights.")}
    # the node is in a private swarm; it has no manifest, hence serves no /biopetals/weights/1
    assert not_applicable == {"transport.handshake.keyed-to-public"} | weights
    assert len(weights) > 25 and all("serves no /biopetals/weights/1" in results[k]["detail"] for k in weights)
    sections = {k.split(".")[0] for k in results}
    assert sections == {"transport", "node", "dht", "weights"} and len(results) > 200


def test_a_node_with_a_manifest_passes_the_weights_checks(tmp_path, manifest_ckpt, capsys):
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(manifest_ckpt, "0:2", *NODE_ARGS)
        status, results = conformance_here(capsys, swarm.key_path, node.addr, "--section", "weights")
    assert failures(results) == {}
    assert status == 0
    assert len(results) > 25 and all(r["outcome"] == "pass" for r in results.values()), \
        {k: r["detail"] for k, r in results.items() if r["outcome"] != "pass"}
    assert "listed in its provider record" in results["weights.chunk.hashes"]["detail"]


def test_a_node_serving_corrupt_chunks_fails_the_chunk_hash_check(tmp_path, manifest_ckpt, capsys, monkeypatch):
    """BIOPETALS_BROKEN=corrupt-chunks flips a byte of every chunk it serves: only weights.chunk.hashes fails."""
    monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(manifest_ckpt, "0:2", *NODE_ARGS, env={"BIOPETALS_BROKEN": "corrupt-chunks"})
        status, results = conformance_here(capsys, swarm.key_path, node.addr,
                                           "--only", "weights.", "--only", "node.info", "--only", "node.forward.ok")
    assert status == 1
    assert set(failures(results)) == {"weights.chunk.hashes"}, failures(results)
    assert "SHA-256" in results["weights.chunk.hashes"]["detail"]
    assert results["node.info"]["outcome"] == "pass" and results["weights.manifest.by-name"]["outcome"] == "pass"


def test_a_broken_node_fails_the_matching_checks(tmp_path, ckpt, monkeypatch):
    """Duplicates run, BAD_POSITION answered as INVALID_FIELD, forged DHT records stored: exactly those checks fail."""
    monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(ckpt, "0:2", *NODE_ARGS, env={"BIOPETALS_BROKEN": "duplicates,position-code,signatures"})
        parts = ("node.step", "node.push", "node.session", "node.open", "node.close", "node.vector.version", "dht.store")
        only = [a for part in parts for a in ("--only", part)]
        status, results = conformance(swarm.key_path, node.addr, *only)
    assert status == 1
    assert set(failures(results)) == {
        "node.step.duplicate", "node.push.duplicate", "node.push.ids-count",
        "node.step.position-gap", "node.step.position-overlap", "node.step.over-max-length",
        "node.step.rollback",  # its BAD_POSITION and duplicate parts (spec/messages.md §5.6.1)
        "dht.store.bad-signature", "dht.store.forged-subkey",
    }, failures(results)
    assert "INVALID_FIELD" in results["node.step.position-gap"]["detail"]
    assert results["node.step.position-gap"]["sent"] and results["node.step.position-gap"]["received"]


def _dht_peer(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "biopetals.dht.cli", *args, "--host", "127.0.0.1", "--port", "0",
                             "--new-swarm"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    addr = proc.stdout.readline().strip()
    assert addr.startswith("/ip4/127.0.0.1/tcp/"), addr
    return proc, addr


def test_dht_only_peer(tmp_path, capsys):
    """A biopetals-dht process: transport and DHT checks pass, node checks are not applicable."""
    from biopetals.transport.keyfiles import write_swarm_key

    key = tmp_path / "swarm.key"
    write_swarm_key(key, None)
    proc, addr = _dht_peer("--swarm-key", str(key))
    try:
        status, results = conformance_here(capsys, key, addr, "--only", "dht.", "--only", "node.info", "--only", "transport.mux")
    finally:
        proc.terminate()
        proc.wait(10)
    assert failures(results) == {}
    assert status == 0
    assert results["node.info"]["outcome"] == "n/a"
    assert all(r["outcome"] == "pass" for k, r in results.items() if k.startswith(("dht.", "transport.")))
    assert sum(k.startswith("dht.vector.") for k in results) > 20


def test_public_swarm_peer(capsys):
    """--public against an unkeyed biopetals-dht: the handshake checks for a public swarm pass, keyed ones are n/a."""
    from biopetals.conformance.cli import main

    proc, addr = _dht_peer("--public")
    try:
        only = ("transport.handshake.ok", "transport.handshake.keyed", "transport.handshake.wrong", "dht.ping")
        status = main(["--public", "--peer", addr, "--json", *(a for part in only for a in ("--only", part))])
    finally:
        proc.terminate()
        proc.wait(10)
    results = {r["id"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert failures(results) == {} and status == 0
    assert results["transport.handshake.keyed-to-public"]["outcome"] == "pass"
    assert results["transport.handshake.wrong-key"]["outcome"] == "n/a"
    assert results["transport.handshake.ok"]["outcome"] == "pass" and results["dht.ping"]["outcome"] == "pass"


class _BadPeer:
    """A loopback TCP listener that misbehaves: 'garbage' (random bytes, then close) or 'close'."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def serve(reader, writer):
            if self.mode == "garbage":
                writer.write(os.urandom(300))
                await writer.drain()
            writer.close()

        self.server = self.loop.run_until_complete(asyncio.start_server(serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("mode", ["garbage", "close"])
def test_a_misbehaving_peer_fails_checks_without_crashing(tmp_path, capsys, mode):
    from biopetals.protocol.identity import Identity
    from biopetals.transport.keyfiles import write_swarm_key

    key = tmp_path / "swarm.key"
    write_swarm_key(key, None)
    peer = _BadPeer(mode)
    try:
        addr = f"/ip4/127.0.0.1/tcp/{peer.port}/p2p/{Identity.generate().peer_id}"
        t0 = time.monotonic()
        section = ("--section", "all") if mode == "garbage" else ("--section", "transport")
        status, results = conformance_here(capsys, key, addr, "--timeout-scale", "0.25", *section)
    finally:
        peer.close()
    assert status == 1
    assert time.monotonic() - t0 < 100
    assert sum(r["outcome"] == "fail" for r in results.values()) > (200 if mode == "garbage" else 15)
    # a handshake with garbage or a closed socket can conform only where closing is the expected answer
    passed = {k for k, r in results.items() if r["outcome"] == "pass"}
    assert passed <= {"transport.handshake.short-message1", "transport.handshake.zero-length",
                      "transport.handshake.oversize-length", "transport.handshake.nonempty-payload"}, passed


def test_cli_help_list_and_usage_errors(tmp_path, capsys):
    from biopetals.conformance.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "--swarm-key" in capsys.readouterr().out
    assert main(["--list", "--section", "transport"]) == 0
    listed = capsys.readouterr().out
    assert "transport.handshake.wrong-key" in listed and "node." not in listed
    assert main(["--public"]) == 2  # no --peer
    peer = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
    assert main(["--swarm-key", str(tmp_path / "nope.key"), "--peer", peer]) == 2
    assert "nope.key" in capsys.readouterr().err
