"""Ten `biopetals-dht` processes on loopback with a swarm key (spec/dht.md §4, §5, §8).

Each node is a separate process started through the CLI with ``--interactive``; the
test drives it over stdin/stdout. A stranger process (another swarm key) must fail
to join. Forged and invalid records are sent by this test process itself, over
the real transport, to every node.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biopetals.dht import messages as m
from biopetals.dht import params
from biopetals.dht.records import Record, record_to_obj, sign_record, signed_payload, to_ms
from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.host import Host
from biopetals.transport.keyfiles import write_swarm_key

N = 10
FAST = ["--request-timeout", "2", "--republish-interval", "2", "--refresh-interval", "30"]


class Node:
    """One CLI process with a line-oriented JSON conversation on stdin/stdout."""

    def __init__(self, swarm_key: Path, log: Path, initial: list[str]) -> None:
        args = [sys.executable, "-m", "biopetals.dht.cli", "--swarm-key", str(swarm_key), "--host", "127.0.0.1",
                "--port", "0", "--interactive", "-v", *FAST]
        args += ["--initial-peers", *initial] if initial else ["--new-swarm"]
        self.log = log
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self._buf = b""
        self.addr: str | None = None

    def wait_addr(self, timeout: float = 30) -> str:
        self.addr = self._readline(timeout)
        return self.addr

    @property
    def peer_id(self) -> str:
        assert self.addr
        return self.addr.rsplit("/p2p/", 1)[1]

    def _readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()  # type: ignore[union-attr]
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise TimeoutError(f"no answer; log:\n{self.log.read_text()[-2000:]}")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"process exited; log:\n{self.log.read_text()[-2000:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def ask(self, command: str, timeout: float = 30) -> dict:
        self.proc.stdin.write(command.encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        answer = json.loads(self._readline(timeout))
        assert "error" not in answer, answer
        return answer

    def get(self, key: str) -> dict:
        return self.ask(f"get {key}")["values"][key]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._err.close()
        return rc


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dht")
    key = tmp / "lab.key"
    write_swarm_key(key, SwarmKey.generate())
    first = Node(key, tmp / "node0.log", [])
    nodes = [first]
    first.wait_addr()
    for i in range(1, N):
        nodes.append(Node(key, tmp / f"node{i}.log", [first.addr]))
    for node in nodes[1:]:
        node.wait_addr()
    yield {"nodes": nodes, "key": key, "tmp": tmp}
    codes = [n.stop() for n in nodes]
    assert all(c in (0, -signal.SIGKILL) for c in codes), codes  # SIGTERM: clean exit 0


def _wait_until(predicate, timeout: float, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


def test_value_stored_at_one_is_found_from_every_other(swarm) -> None:
    nodes = swarm["nodes"]
    # everyone bootstrapped: every node knows others (joins spread through self-lookups)
    assert _wait_until(lambda: all(n.ask("stats")["contacts"] >= 3 for n in nodes), 15)
    writer = nodes[3]
    result = writer.ask("store m.0 hello 60")
    assert result["accepted"] == N and result["rejected"] == {}
    for node in nodes:
        if node is not writer:
            found = node.get("m.0")
            assert found[writer.peer_id]["value"] == "hello", (node.peer_id, found)
    nodes[5].ask("store m.1 one 60")
    nodes[6].ask("store m.1 uno 60")
    many = nodes[7].ask("get m.0 m.1 m.2")["values"]
    assert many["m.0"][writer.peer_id]["value"] == "hello"
    assert {v["value"] for v in many["m.1"].values()} == {"one", "uno"}
    assert many["m.2"] == {}


def test_killed_node_records_expire_and_disappear(swarm) -> None:
    nodes = swarm["nodes"]
    victim = nodes[9]
    assert victim.ask("store m.dead bye 3")["accepted"] == N
    assert nodes[0].get("m.dead")[victim.peer_id]["value"] == "bye"
    victim.proc.kill()
    victim.proc.wait()
    time.sleep(3.2)
    for node in nodes[:9]:
        assert node.get("m.dead") == {}
    # the records are gone from storage too (not merely filtered): the maintenance loop expired them
    assert _wait_until(lambda: all(n.ask("stats")["expired"] >= 1 for n in nodes[:9]), 5)


def test_forged_and_invalid_records_rejected_by_every_node(swarm) -> None:
    nodes = [n for n in swarm["nodes"] if n.proc.poll() is None]
    victim = swarm["nodes"][3]
    mallory = Identity.generate()
    now = time.time()
    victim_id = PeerId.from_base58(victim.peer_id).multihash
    forged = sign_record(mallory, "m.0", victim_id, b"evil", to_ms(now + 120))
    expired = sign_record(mallory, "m.x", mallory.peer_id.multihash, b"v", to_ms(now - 1))
    far = sign_record(mallory, "m.x", mallory.peer_id.multihash, b"v", to_ms(now + params.MAX_TTL + params.CLOCK_SKEW + 60))
    big_value = b"v" * (params.MAX_VALUE_BYTES + 1)
    exp = to_ms(now + 60)
    oversized = Record("m.x", mallory.peer_id.multihash, big_value, exp, mallory.public_key,
                       mallory.sign(signed_payload("m.x", mallory.peer_id.multihash, big_value, exp)))
    key = SwarmKey.parse(swarm["key"].read_bytes())

    async def send_all() -> list[tuple[m.Response, m.Response]]:
        out = []
        async with Host(mallory, swarm_key=key) as host:
            for node in nodes:
                req = m.StoreRequest((forged, expired, far), ())
                a = m.decode_response(await host.call(node.addr, params.PROTOCOL, m.encode(req), timeout=10))
                raw = m.pack({0: m.STORE_REQUEST, 1: [], 2: [record_to_obj(oversized)]})
                b = m.decode_response(await host.call(node.addr, params.PROTOCOL, raw, timeout=10))
                out.append((a, b))
        return out

    for a, b in asyncio.run(send_all()):
        assert a == m.StoreResponse((ErrorCode.BAD_SIGNATURE, ErrorCode.RECORD_EXPIRED, ErrorCode.EXPIRATION_TOO_FAR))
        assert isinstance(b, m.ErrorResponse) and b.code == ErrorCode.RECORD_TOO_LARGE
    for node in nodes:
        found = node.get("m.0")
        assert found[victim.peer_id]["value"] == "hello"
        assert node.get("m.x") == {}


def test_latecomer_receives_records_by_republish(swarm) -> None:
    """spec/dht.md §8.4: writers re-send their records, so a node that joins later holds them."""
    nodes = [n for n in swarm["nodes"] if n.proc.poll() is None]
    late = Node(swarm["key"], swarm["tmp"] / "late.log", [nodes[1].addr])
    try:
        late.wait_addr()
        # m.0 (node 3) and m.1 (nodes 5 and 6) are republished every 2 s (--republish-interval)
        assert _wait_until(lambda: late.ask("stats")["records"] >= 3, 10), late.ask("stats")
    finally:
        assert late.stop() == 0


def test_node_without_the_swarm_key_cannot_join(swarm) -> None:
    """A node whose initial peers all refuse its swarm key exits 1 saying so, never running alone (issue 24)."""
    nodes = [n for n in swarm["nodes"] if n.proc.poll() is None]
    other_key = swarm["tmp"] / "other.key"
    write_swarm_key(other_key, SwarmKey.generate())
    contacts = [len(node.ask("stats")["contact_ids"]) for node in nodes]
    result = subprocess.run([sys.executable, "-m", "biopetals.dht.cli", "--swarm-key", str(other_key), "--host",
                             "127.0.0.1", "--port", "0", "--initial-peers", nodes[0].addr],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""  # no address: it never served
    assert "wrong swarm key" in result.stderr and "SWARM_KEY_MISMATCH" in result.stderr
    assert "--new-swarm" in result.stderr
    assert [len(node.ask("stats")["contact_ids"]) for node in nodes] == contacts

    async def call_with_wrong_key() -> ProtocolError | None:
        async with Host(Identity.generate(), swarm_key=SwarmKey.generate()) as host:
            try:
                await host.call(nodes[1].addr, params.PROTOCOL, m.encode(m.PingRequest(())), timeout=10)
            except ProtocolError as e:
                return e
        return None

    error = asyncio.run(call_with_wrong_key())
    assert error is not None and error.code == ErrorCode.SWARM_KEY_MISMATCH
