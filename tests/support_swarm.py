"""Test harness: a private swarm of real ``biopetals-node`` processes on loopback.

Usage from a test module (tests/ is on sys.path, as for support_models)::

    from support_swarm import Swarm

    def test_something(tmp_path, tiny_llama_checkpoint):
        with Swarm(tmp_path) as swarm:
            first = swarm.start_node(tiny_llama_checkpoint, "0:4")          # --new-swarm
            second = swarm.start_node(tiny_llama_checkpoint, "4:8")         # joins through `first`
            ...  # first.addr is its multiaddr, swarm.swarm_key the SwarmKey, swarm.key_path its file

or the ``swarm`` fixture (``from support_swarm import swarm``), which tears down after
the test. What it does:

- writes a swarm key file in ``tmp_path`` (``swarm.key_path``);
- the first node starts with ``--new-swarm``, later ones with ``--initial-peers``
  naming the first node's multiaddr (nodes are DHT nodes too);
- every node listens on 127.0.0.1 with a free port (``--port 0``), and the harness
  waits (``timeout`` s) for its ``READY <multiaddr>`` line, failing with the node's
  output if it exits or times out;
- ``node.stop()`` sends SIGTERM and waits (the node announces offline first);
  ``node.kill()`` sends SIGKILL; leaving ``with Swarm`` (also on a failing test)
  terminates, then kills, whatever still runs.

Each node's stdout and stderr go to ``tmp_path/node-<n>.log`` (``node.output()``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.keyfiles import write_swarm_key

__all__ = ["Swarm", "NodeProcess", "swarm", "NODE_COMMAND"]

#: How a node process is started: the installed console entry point's module.
NODE_COMMAND = [sys.executable, "-m", "biopetals.node.cli"]


@dataclass
class NodeProcess:
    """One running ``biopetals-node``."""

    process: subprocess.Popen
    log_path: Path
    addr: str = ""
    blocks: str = ""
    args: list[str] = field(default_factory=list)

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[1]

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; returns the exit status (kills after ``timeout``)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
        self.process.wait(5)


class Swarm:
    """Starts and owns node processes; a context manager that always cleans up."""

    def __init__(self, tmp_path: Path, *, swarm_key: SwarmKey | None = None) -> None:
        self.tmp_path = Path(tmp_path)
        self.key_path = self.tmp_path / "swarm.key"
        self.swarm_key = write_swarm_key(self.key_path, swarm_key, overwrite=True)
        self.nodes: list[NodeProcess] = []

    def __enter__(self) -> "Swarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def initial_peers(self) -> list[str]:
        """Multiaddrs of the running nodes, for joining (clients and further nodes)."""
        return [n.addr for n in self.nodes if n.alive() and n.addr]

    def start_node(
        self,
        model: str | os.PathLike,
        blocks: str,
        *extra: str,
        timeout: float = 90.0,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> NodeProcess:
        """Start a node serving ``blocks`` ("START:END") and wait for its READY line.

        ``prefix``: a command the node runs under, e.g. ``("prlimit", "--nofile=1024:1024")``."""
        node = self.spawn_node(model, "--blocks", blocks, *extra, env=env, prefix=prefix)
        node.blocks = blocks
        node.addr = self._wait_ready(node, timeout)
        return node

    def spawn_node(
        self, model: str | os.PathLike, *extra: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> NodeProcess:
        """Start a node (``extra``: ``--blocks A:B`` or ``--num-blocks N``, ...) without waiting:
        ``wait_ready(node)`` then. Several spawned at once join concurrently."""
        peers = self.initial_peers
        args = [
            "--model", str(model), "--swarm-key", str(self.key_path),
            "--host", "127.0.0.1", "--port", "0", "--no-progress",
            "--dtype", "float32",  # the reference dtype of the numeric checks on any device (--dtype in extra wins)
            "--throughput-cache", "none",  # measure: a user's cache file never decides a test (extra may name one)
        ]
        args += ["--initial-peers", *peers[:1]] if peers else ["--new-swarm"]
        args += list(extra)
        return self._spawn([*prefix, *NODE_COMMAND, *args], args, env)

    def start_dht(self, timeout: float = 30.0) -> NodeProcess:
        """A ``biopetals-dht`` bootstrap peer (serves no blocks); its first line is its multiaddr."""
        args = ["--swarm-key", str(self.key_path), "--host", "127.0.0.1", "--port", "0", "--new-swarm"]
        node = self._spawn([sys.executable, "-m", "biopetals.dht.cli", *args], args, None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not node.addr:
            lines = node.output().splitlines()
            if lines and lines[0].startswith("/ip4/"):
                node.addr = lines[0].strip()
            elif not node.alive():
                raise RuntimeError(f"biopetals-dht exited:\n{node.output()}")
            time.sleep(0.05)
        if not node.addr:
            raise RuntimeError(f"biopetals-dht printed no address within {timeout} s:\n{node.output()}")
        return node

    def wait_ready(self, node: NodeProcess, timeout: float = 90.0) -> NodeProcess:
        """Wait for a spawned node's READY line (``node.addr``)."""
        node.addr = self._wait_ready(node, timeout)
        return node

    def _spawn(self, command: list[str], args: list[str], env: dict[str, str] | None) -> NodeProcess:
        log_path = self.tmp_path / f"node-{len(self.nodes)}.log"
        node_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        node_env.update(env or {})
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=node_env,
                                       start_new_session=True)
        node = NodeProcess(process, log_path, args=args)
        self.nodes.append(node)
        return node

    def _wait_ready(self, node: NodeProcess, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in node.output().splitlines():
                if line.startswith("READY "):
                    return line.split(None, 1)[1].strip()
            if not node.alive():
                raise RuntimeError(f"node exited with {node.process.returncode} before READY:\n{node.output()}")
            time.sleep(0.05)
        node.kill()
        raise RuntimeError(f"node not READY within {timeout} s:\n{node.output()}")

    def close(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.process.terminate()
        deadline = time.monotonic() + 15
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(5)


@pytest.fixture
def swarm(tmp_path):
    """A ``Swarm`` in ``tmp_path``, torn down after the test (also when it fails)."""
    with Swarm(tmp_path) as s:
        yield s


# ----------------------------------------------------------------------------- a raw protocol client


class RawClient:
    """The node protocol spoken by hand, for tests: one ``Host`` with a fresh identity.

    ::

        async with RawClient(swarm.swarm_key) as client:
            info = await client.request(node.addr, NodeInfoRequest())
            stream, opened = await client.open_session(node.addr, OpenSession(...))
            reply = await client.exchange(stream, Step(...))
    """

    def __init__(self, swarm_key: SwarmKey, *, timeout: float = 30.0) -> None:
        from biopetals.protocol.identity import Identity
        from biopetals.transport.host import Host

        self.timeout = timeout
        self.host = Host(Identity.generate(), swarm_key=swarm_key)

    async def __aenter__(self) -> "RawClient":
        await self.host.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.host.__aexit__(*exc)

    async def request_bytes(self, addr: str, data: bytes):
        """Send raw bytes as the first message of a stream; return the decoded reply."""
        from biopetals.protocol.envelope import PROTOCOL_NAME
        from biopetals.protocol.messages import decode_message

        reply = await self.host.call(addr, PROTOCOL_NAME, data, timeout=self.timeout)
        return decode_message(reply)

    async def request(self, addr: str, message, codec=None):
        from biopetals.protocol.messages import encode_message

        return await self.request_bytes(addr, encode_message(message, codec))

    async def open_session(self, addr: str, open_message):
        """Open a session stream; returns ``(stream, reply)`` (reply: SessionOpened or Error)."""
        from biopetals.protocol.envelope import PROTOCOL_NAME
        from biopetals.protocol.messages import encode_message

        stream = await self.host.open_stream(addr, PROTOCOL_NAME, timeout=self.timeout)
        await stream.send(encode_message(open_message))
        return stream, await self.receive(stream)

    async def receive(self, stream):
        import asyncio

        from biopetals.protocol.messages import decode_message

        async with asyncio.timeout(self.timeout):
            return decode_message(await stream.receive())

    async def exchange(self, stream, message, codec=None):
        """Send one message on a session stream and return the next reply."""
        from biopetals.protocol.messages import encode_message

        await stream.send(message if isinstance(message, bytes) else encode_message(message, codec))
        return await self.receive(stream)
