"""A WAN-emulating TCP relay on 127.0.0.1: a one-way delay each way and a bandwidth cap per link.

Put one in front of each node and start the node with ``--announce`` naming the relay's
address: the client's connections and the node-to-node pushes then all pass through the
relays, each direction of each connection delayed by ``--delay-ms`` and capped at
``--rate-mbit`` (benchmarks/bench_wan.py does this). The timing rules are in
benchmarks/wan_link.py (sans-IO, tested with a fake clock); this file only drives
them with asyncio. Loopback only: it listens on and dials 127.0.0.1, nothing else.

    python benchmarks/wan_relay.py --delay-ms 50 --rate-mbit 100 --to 40001 --to 40002

prints ``RELAY <listen port> <target port>`` per ``--to``, then ``READY``, and relays until
SIGTERM/SIGINT or until its standard input closes (the process that started it is gone).
A line ``DELAY <ms>`` on its standard input changes the one-way delay of every link, open
connections included (a benchmark then measures several RTTs over one swarm).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan_link import MBIT, LinkSchedule  # noqa: E402

__all__ = ["Relay", "RelayProcess"]

HOST = "127.0.0.1"
READ_SIZE = 16 * 1024  # bytes per read: one chunk is sent store-and-forward, so keep it small (1.3 ms at 100 Mbit/s)
QUEUE_CHUNKS = 512  # chunks in flight per direction before the relay stops reading (8 MiB)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkSchedule) -> None:
    """Copy ``reader`` to ``writer``, each chunk written when ``link`` says it arrives; EOF passes on too."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

    async def receive() -> None:
        while True:
            data = await reader.read(READ_SIZE)
            await queue.put((link.accept(loop.time(), len(data)), data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(receive())
        tg.create_task(deliver())


class Relay:
    """Relays connections to ``127.0.0.1:<listen port>`` to ``127.0.0.1:<target port>`` over emulated links."""

    def __init__(self, target_port: int, *, delay: float = 0.0, rate: float | None = None) -> None:
        LinkSchedule(delay, rate)  # refuses bad numbers now, not per connection
        self.target_port = target_port
        self.delay = delay
        self.rate = rate
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.links: set[LinkSchedule] = set()

    def set_delay(self, delay: float) -> None:
        """A new one-way delay for new and open connections (chunks already queued keep theirs)."""
        LinkSchedule(delay, self.rate)
        self.delay = delay
        for link in self.links:
            link.delay = delay

    async def start(self, port: int = 0) -> int:
        """Listen; the port it listens on."""
        self.server = await asyncio.start_server(self._serve, HOST, port)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            u_reader, u_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            c_writer.close()
            return
        links = (LinkSchedule(self.delay, self.rate), LinkSchedule(self.delay, self.rate))
        self.links.update(links)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(c_reader, u_writer, links[0]))
                tg.create_task(_pump(u_reader, c_writer, links[1]))
        except* OSError:  # one side reset: close both
            pass
        finally:
            self.links.difference_update(links)
            for w in (c_writer, u_writer):
                w.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)


class RelayProcess:
    """``wan_relay.py`` as a child process, one relay per target port: ``ports[target] = listen port``."""

    def __init__(self, targets: list[int], *, delay: float, rate: float | None) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--delay-ms", str(delay * 1000)]
        if rate is not None:
            cmd += ["--rate-mbit", str(rate / MBIT)]
        for t in targets:
            cmd += ["--to", str(t)]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ports: dict[int, int] = {}
        self.delay = delay
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("RELAY "):
                _, listen, target = line.split()
                self.ports[int(target)] = int(listen)
            elif line.startswith("READY"):
                return
        raise RuntimeError(f"wan_relay.py exited with {self.process.wait()} before READY")

    def set_delay(self, delay: float) -> None:
        """Change the one-way delay of every relay (open connections included)."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"DELAY {delay * 1000}\n")
        self.process.stdin.flush()
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("DELAY "):
                self.delay = delay
                return
        raise RuntimeError(f"wan_relay.py exited with {self.process.wait()}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "RelayProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay each way, ms (default 0; RTT = 2x)")
    p.add_argument("--rate-mbit", type=float, default=None,
                   help="bandwidth of each direction of each connection, Mbit/s (default: unlimited)")
    p.add_argument("--to", type=int, action="append", required=True, metavar="PORT",
                   help="relay to 127.0.0.1:PORT (repeat for several relays; each listens on a free port)")
    return p


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    rate = args.rate_mbit * MBIT if args.rate_mbit else None
    relays = [Relay(t, delay=args.delay_ms / 1000, rate=rate) for t in args.to]

    def set_delay(ms: float) -> None:
        for relay in relays:
            relay.set_delay(ms / 1000)
        print(f"DELAY {ms}", flush=True)  # the acknowledgement RelayProcess.set_delay waits for

    def watch_stdin() -> None:  # DELAY commands; the parent is gone when our stdin closes
        for line in sys.stdin:
            words = line.split()
            if len(words) == 2 and words[0] == "DELAY":
                try:
                    loop.call_soon_threadsafe(set_delay, float(words[1]))
                except ValueError:
                    print(f"wan_relay.py: bad delay {words[1]!r}", file=sys.stderr, flush=True)
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    for relay in relays:
        print(f"RELAY {await relay.start()} {relay.target_port}", flush=True)
    print("READY", flush=True)
    await stop.wait()
    for relay in relays:
        await relay.aclose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        LinkSchedule(args.delay_ms / 1000, args.rate_mbit * MBIT if args.rate_mbit else None)
    except ValueError as e:
        print(f"wan_relay.py: {e}", file=sys.stderr)
        return 2
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
