"""Start a private swarm of ``biopetals-node`` processes on loopback (demo, benchmarks, tests).

``LocalSwarm(model_path, [(0, 10), (10, 20), (20, 30)])`` writes a fresh swarm key
into a temporary directory, starts one node process per span (the first with
``--new-swarm``, the others joining through it; named ``local-0``, ``local-1``, ... by
``--public-name``), starts each next node as soon as the one before prints
``DHT <multiaddr>`` (it answers DHT requests: the next one can join through it while it
still imports and loads), waits for every node to print ``READY <multiaddr>``, and stops them all on ``close()`` (SIGTERM, then SIGKILL
after a grace period) - also when the caller is interrupted, since it is a
context manager. Nodes are separate processes started through the command line;
the client never imports the node's code.

Nothing it starts outlives the program (issue 24): while a swarm is open in the main
thread, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` there as Ctrl-C does, so the
``with`` block unwinds and ``close()`` stops the nodes; and every node runs with
``--exit-with-parent``, so it stops by itself when this process dies in any other way
(``kill -9``, a crash of the interpreter).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.keyfiles import write_swarm_key

__all__ = ["LocalSwarm", "NodeProcess"]


@dataclass
class NodeProcess:
    start: int
    end: int
    process: subprocess.Popen
    log_path: Path
    addr: str = ""  # from its READY line
    dht_addr: str = ""  # from its DHT line (before READY)
    lines: list[str] = field(default_factory=list)
    output: "queue.Queue[str | None] | None" = None  # its output, line by line (None at the end)
    deadline: float = 0.0  # time.monotonic() by which it must be READY

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[-1]

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node dies without a word (for fault-tolerance tests)."""
        if self.alive():
            self.process.kill()
            self.process.wait(10)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the node announces itself offline), SIGKILL after ``grace`` seconds."""
        if not self.alive():
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()


class LocalSwarm:
    """Node processes on 127.0.0.1 serving ``spans`` of the checkpoint at ``model``."""

    def __init__(
        self,
        model: str | os.PathLike,
        spans: list[tuple[int, int]],
        *,
        dtype: str = "float32",
        extra_args: list[str] | None = None,
        benchmark: bool = False,
        ready_timeout: float = 180.0,
        threads: int | None = None,
    ) -> None:
        self.model = str(model)
        self.dtype = dtype
        self.extra_args = list(extra_args or [])
        self.benchmark = benchmark
        self.ready_timeout = ready_timeout
        self.threads = threads
        self.dir = Path(tempfile.mkdtemp(prefix="biopetals-swarm-"))
        self.key_path = self.dir / "swarm.key"
        write_swarm_key(self.key_path, SwarmKey.generate())
        self.nodes: list[NodeProcess] = []
        self._previous_handlers = _interrupt_on_signals()
        try:
            for start, end in spans:  # each starts once the one before answers DHT requests
                self._launch(start, end)
            for node in self.nodes:
                self._wait_for(node, "READY ")
        except BaseException:
            self.close()
            raise

    @property
    def initial_peers(self) -> list[str]:
        return [n.addr or n.dht_addr for n in self.nodes if n.alive()][:3]

    def _command(self, start: int, end: int) -> list[str]:
        cmd = [sys.executable, "-m", "biopetals.node.cli", "--model", self.model, "--blocks", f"{start}:{end}",
               "--swarm-key", str(self.key_path), "--host", "127.0.0.1", "--port", "0", "--dtype", self.dtype,
               "--no-progress", "--exit-with-parent", "--public-name", f"local-{len(self.nodes)}"]
        # measuring: a fresh measurement, never a number a user's throughput cache kept (extra_args may name one)
        cmd += ["--throughput-cache", "none"] if self.benchmark else ["--no-benchmark"]
        if self.threads is not None:
            cmd += ["--num-threads", str(self.threads)]
        peers = self.initial_peers
        cmd += ["--initial-peers", *peers] if peers else ["--new-swarm"]
        return cmd + self.extra_args

    def add_node(self, start: int, end: int) -> NodeProcess:
        """Start one more node for blocks ``[start, end)`` and wait until it serves."""
        node = self._launch(start, end)
        self._wait_for(node, "READY ")
        return node

    def _launch(self, start: int, end: int) -> NodeProcess:
        """Start a node process; returns once it answers DHT requests (its ``DHT`` line)."""
        log_path = self.dir / f"node-{len(self.nodes)}-{start}-{end}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # READY must reach us at once through the pipe
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        # idle OpenMP threads sleep instead of spinning (node/cli.py sets it too; see there)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        proc = subprocess.Popen(self._command(start, end), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, start_new_session=True)
        node = NodeProcess(start, end, proc, log_path)
        node.output = queue.Queue()
        node.deadline = time.monotonic() + self.ready_timeout
        self.nodes.append(node)
        _pump(proc, log_path, node.output)
        self._wait_for(node, "DHT ")
        return node

    def _wait_for(self, node: NodeProcess, prefix: str) -> None:
        """Read the node's lines until one starts with ``prefix`` (``READY``: its address is set)."""
        if prefix == "READY " and node.addr:
            return
        while True:
            left = node.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"node {node.start}:{node.end} not ready in {self.ready_timeout:.0f} s; its output:\n"
                                   + "".join(node.lines[-20:]))
            try:
                line = node.output.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                node.process.wait(5)
                raise RuntimeError(f"node {node.start}:{node.end} exited with {node.process.returncode}:\n"
                                   + "".join(node.lines[-20:]))
            node.lines.append(line)
            if line.startswith("DHT ") and not node.dht_addr:
                node.dht_addr = line.split()[1]
            if line.startswith("READY "):
                node.addr = line.split()[1]
                return
            if line.startswith(prefix):
                return

    def close(self) -> None:
        _restore_handlers(self._previous_handlers)
        self._previous_handlers = {}
        for node in self.nodes:
            if node.alive():
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Signals that stop a program holding a LocalSwarm the way Ctrl-C does.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def _interrupt_on_signals() -> dict[int, object]:
    """Make STOP_SIGNALS raise KeyboardInterrupt (main thread only); the handlers they had before."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; the nodes still stop with the process
    previous = {}
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, None):  # a handler the program chose is kept
            previous[sig] = signal.signal(sig, _interrupt)
    return previous


def _restore_handlers(previous: dict[int, object]) -> None:
    if threading.current_thread() is threading.main_thread():
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _pump(proc: subprocess.Popen, log_path: Path, lines: "queue.Queue[str | None]") -> None:
    """Copy the node's output to its log file and to ``lines`` (None at the end), in a thread."""

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True, name=f"node-log-{proc.pid}").start()
