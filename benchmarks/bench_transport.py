"""Transport benchmark: BioPetals (Noise + mux) side by side with plain asyncio TCP.

Measures, in one run and against the same server process:

* median and p99 round-trip time of 64 B and 8 KiB request/response calls,
  one at a time on one connection (plain and BioPetals in interleaved blocks, so
  a drift of the machine's speed during the run hits both alike), and 32 at once
  (BioPetals: 32 concurrent streams on one connection; plain TCP has no
  multiplexing, so 32 connections);
* MB/s of 16 MiB messages (request of 16 MiB, 2-byte response), one at a time
  and 32 at once.

BioPetals rows are measured twice where the server's handler kind matters: with
``async def`` handlers (``Host.set_handler``, a task per request) and with inline
handlers (``Host.set_inline_handler``, called in the receive path; rows marked
"inline"). The client side (``Host.call``) is the same for both.

The plain baseline is the usual asyncio code: ``StreamReader.readexactly`` on a
4-byte big-endian length prefix, ``writer.write`` + ``drain``. Both servers run in
one child process, the client in this one, so each side has its own event loop.
Targets (issue 3): 8 KiB RTT at most 1.5x plain TCP; at least 250 MB/s for 16 MiB.

    .venv/bin/python benchmarks/bench_transport.py            # full run, markdown table
    .venv/bin/python benchmarks/bench_transport.py --quick    # fewer rounds
    .venv/bin/python benchmarks/bench_transport.py --rtt      # RTT and CPU rows only (no 16 MiB rows)
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import sys
import time
from typing import Awaitable, Callable

from biopetals.protocol.identity import Identity
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host

ECHO = "/bench/echo/1"
SINK = "/bench/sink/1"
ECHO_INLINE = "/bench/echo-inline/1"
SINK_INLINE = "/bench/sink-inline/1"
_LEN = struct.Struct(">I")
MiB = 1 << 20
#: The one-stream RTT rows are measured in this many interleaved blocks per kind.
RTT_BLOCKS = 10


# --------------------------------------------------------------------------- server process


async def _plain_handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (n,) = _LEN.unpack(await reader.readexactly(4))
            kind = await reader.readexactly(1)
            body = await reader.readexactly(n - 1)
            reply = body if kind == b"e" else b"ok"
            writer.write(_LEN.pack(len(reply)) + reply)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve(conn: mp.connection.Connection, swarm_key: bytes) -> None:
    plain = await asyncio.start_server(_plain_handle, "127.0.0.1", 0, limit=1 << 20)
    plain_port = plain.sockets[0].getsockname()[1]

    async def echo(peer_id: object, request: bytes) -> bytes:
        return request

    async def sink(peer_id: object, request: bytes) -> bytes:
        return b"ok"

    async with Host(Identity.generate(), swarm_key=swarm_key, config=TransportConfig(keepalive_interval=0)) as host:
        host.set_handler(ECHO, echo)
        host.set_handler(SINK, sink)
        host.set_inline_handler(ECHO_INLINE, lambda peer_id, request: request)
        host.set_inline_handler(SINK_INLINE, lambda peer_id, request: b"ok")
        addrs = await host.listen("127.0.0.1", 0)
        conn.send((plain_port, str(addrs[0])))
        loop = asyncio.get_running_loop()
        while await loop.run_in_executor(None, conn.recv) == "cpu":  # until the parent says stop
            conn.send(time.process_time())
        plain.close()


def _server_main(conn: mp.connection.Connection, swarm_key: bytes) -> None:
    asyncio.run(_serve(conn, swarm_key))


# --------------------------------------------------------------------------- client side


class PlainClient:
    """One plain TCP connection; one request in flight at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> PlainClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        return cls(reader, writer)

    async def call(self, kind: bytes, payload: bytes) -> bytes:
        self.writer.write(_LEN.pack(len(payload) + 1) + kind)
        self.writer.write(payload)
        await self.writer.drain()
        (n,) = _LEN.unpack(await self.reader.readexactly(4))
        return await self.reader.readexactly(n)

    def close(self) -> None:
        self.writer.close()


async def _timed(fn: Callable[[], Awaitable[object]], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def _timed_concurrent(fns: list[Callable[[], Awaitable[object]]], rounds: int) -> tuple[list[float], float]:
    """Each fn runs ``rounds`` times in its own task; returns per-call latencies and wall time."""
    latencies: list[float] = []

    async def worker(fn: Callable[[], Awaitable[object]]) -> None:
        latencies.extend(await _timed(fn, rounds))

    t = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for fn in fns:
            tg.create_task(worker(fn))
    return latencies, time.perf_counter() - t


def _median_p99(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return statistics.median(s), s[min(len(s) - 1, int(len(s) * 0.99))]


class Cpu:
    """CPU seconds (user + system) used by this process and the server process during a block."""

    def __init__(self, pipe: mp.connection.Connection) -> None:
        self.pipe = pipe
        self.seconds = 0.0

    def _server(self) -> float:
        self.pipe.send("cpu")
        return float(self.pipe.recv())

    def __enter__(self) -> Cpu:
        self._start = time.process_time() + self._server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.process_time() + self._server() - self._start


async def _client(
    plain_port: int, addr: str, swarm_key: bytes, quick: bool, rtt_only: bool, pipe: mp.connection.Connection
) -> list[tuple[str, str, str, str]]:
    rtt_rounds = 500 if quick else 3000
    big_rounds = 3 if quick else 8
    conc_big_rounds = 1 if quick else 2
    rows: list[tuple[str, str, str, str]] = []
    async with Host(Identity.generate(), swarm_key=swarm_key, config=TransportConfig(keepalive_interval=0)) as host:
        conn = await host.connect(addr)
        peer = conn.peer_id
        plain = await PlainClient.connect(plain_port)
        plains = [await PlainClient.connect(plain_port) for _ in range(32)]

        def ours(protocol: str, payload: bytes) -> Awaitable[bytes]:
            # The call's own coroutine, no wrapper around it (plain.call is awaited directly too).
            return host.call(peer, protocol, payload, timeout=60)

        # warm up every path (connections, allocator)
        for _ in range(50):
            await plain.call(b"e", b"x" * 8192)
            await ours(ECHO, b"x" * 8192)
            await ours(ECHO_INLINE, b"x" * 8192)

        for size, label in ((64, "64 B"), (8192, "8 KiB")):
            payload = os.urandom(size)
            # Interleaved blocks (plain, ours, ours inline, plain, ...): a change in the machine's
            # state during the run (other tenants, clocks) affects all three alike.
            kinds = {
                "plain": lambda payload=payload: plain.call(b"e", payload),
                "": lambda payload=payload: ours(ECHO, payload),
                ", inline handler": lambda payload=payload: ours(ECHO_INLINE, payload),
            }
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            cpu = dict.fromkeys(kinds, 0.0)
            for _ in range(RTT_BLOCKS):
                for kind, fn in kinds.items():
                    with Cpu(pipe) as c:
                        samples[kind] += await _timed(fn, rtt_rounds // RTT_BLOCKS)
                    cpu[kind] += c.seconds
            p = _median_p99(samples["plain"])
            pcpu = cpu["plain"] / len(samples["plain"]) * 1e6
            for kind in ("", ", inline handler"):
                b = _median_p99(samples[kind])
                rows.append((f"RTT {label}, 1 stream{kind}: median / p99 (us)", f"{p[0]*1e6:.0f} / {p[1]*1e6:.0f}",
                             f"{b[0]*1e6:.0f} / {b[1]*1e6:.0f}", f"{b[0]/p[0]:.2f}x"))
                bcpu = cpu[kind] / len(samples[kind]) * 1e6
                rows.append((f"CPU per {label} call{kind}, client + server (us)", f"{pcpu:.0f}", f"{bcpu:.0f}", f"{bcpu/pcpu:.2f}x"))
            per = max(20, rtt_rounds // 32)
            pl, pw = await _timed_concurrent([lambda c=c: c.call(b"e", payload) for c in plains], per)
            for protocol, kind in ((ECHO, ""), (ECHO_INLINE, ", inline handler")):
                bl, bw = await _timed_concurrent([lambda protocol=protocol: ours(protocol, payload)] * 32, per)
                p2, b = _median_p99(pl), _median_p99(bl)
                rows.append((f"RTT {label}, 32 concurrent{kind}: median / p99 (us)", f"{p2[0]*1e6:.0f} / {p2[1]*1e6:.0f}",
                             f"{b[0]*1e6:.0f} / {b[1]*1e6:.0f}", f"{b[0]/p2[0]:.2f}x"))
                rows.append((f"calls/s {label}, 32 concurrent{kind}", f"{len(pl)/pw:.0f}", f"{len(bl)/bw:.0f}",
                             f"{(len(bl)/bw)/(len(pl)/pw):.2f}x"))
        if rtt_only:
            plain.close()
            for c in plains:
                c.close()
            return rows

        big = os.urandom(16 * MiB)
        await plain.call(b"s", big)
        await ours(SINK, big)
        with Cpu(pipe) as pc:
            p = statistics.median(await _timed(lambda: plain.call(b"s", big), big_rounds))
        with Cpu(pipe) as bc:
            b = statistics.median(await _timed(lambda: ours(SINK, big), big_rounds))
        rows.append(("16 MiB messages, 1 stream (MB/s)", f"{16*MiB/p/1e6:.0f}", f"{16*MiB/b/1e6:.0f}", f"{p/b:.2f}x"))
        b2 = statistics.median(await _timed(lambda: ours(SINK_INLINE, big), big_rounds))
        rows.append(("16 MiB messages, 1 stream, inline handler (MB/s)", f"{16*MiB/p/1e6:.0f}", f"{16*MiB/b2/1e6:.0f}", f"{p/b2:.2f}x"))
        pm, bm = big_rounds * 16 * MiB / pc.seconds / 1e6, big_rounds * 16 * MiB / bc.seconds / 1e6
        rows.append(("16 MiB messages: MB per CPU-second, client + server", f"{pm:.0f}", f"{bm:.0f}", f"{bm/pm:.2f}x"))
        _, pw = await _timed_concurrent([lambda c=c: c.call(b"s", big) for c in plains], conc_big_rounds)
        _, bw = await _timed_concurrent([lambda: ours(SINK, big)] * 32, conc_big_rounds)
        total = 32 * conc_big_rounds * 16 * MiB
        rows.append(("16 MiB messages, 32 concurrent (MB/s)", f"{total/pw/1e6:.0f}", f"{total/bw/1e6:.0f}", f"{pw/bw:.2f}x"))
        p = statistics.median(await _timed(lambda: plain.call(b"e", big), max(2, big_rounds // 2)))
        b = statistics.median(await _timed(lambda: ours(ECHO, big), max(2, big_rounds // 2)))
        rows.append(("16 MiB echo, 1 stream (MB/s, both directions)", f"{32*MiB/p/1e6:.0f}", f"{32*MiB/b/1e6:.0f}", f"{p/b:.2f}x"))
        plain.close()
        for c in plains:
            c.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--public", action="store_true", help="public swarm (no swarm key)")
    parser.add_argument("--rtt", action="store_true", help="only the RTT, CPU and calls/s rows (skip 16 MiB messages)")
    args = parser.parse_args()
    swarm_key = None if args.public else os.urandom(32)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_server_main, args=(child, swarm_key), daemon=True)
    server.start()
    try:
        plain_port, addr = parent.recv()
        rows = asyncio.run(_client(plain_port, addr, swarm_key, args.quick, args.rtt, parent))
    finally:
        parent.send("stop")
        server.join(10)
        if server.is_alive():
            server.kill()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs (load average {load:.1f} at the end), loopback, "
          "client and server in separate processes\n")
    print("| measurement | plain asyncio TCP | BioPetals (Noise + mux) | BioPetals vs plain |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
