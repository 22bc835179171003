"""Attacks of issue 21 as an insider or outsider would run them, for tests and benchmarks/bench_hostile.py.

Each attack is bounded: a fixed count of streams, connections or records, and it
ends by itself. Targets are loopback addresses only. ``process_usage(pid)`` reads
a node process's resident memory and open descriptors from /proc (Linux).
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass

from biopetals.protocol.framing import LENGTH_PREFIX_BYTES
from biopetals.protocol.identity import Identity
from biopetals.protocol.mux import MAX_DATA_PAYLOAD
from biopetals.transport.connection import Connection
from biopetals.transport.host import Host

__all__ = ["Usage", "process_usage", "partial_messages", "half_open_connections", "silent_streams"]


@dataclass(frozen=True)
class Usage:
    rss: int  # bytes
    fds: int


def process_usage(pid: int) -> Usage:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return Usage(rss, len(os.listdir(f"/proc/{pid}/fd")))


def _send_raw(conn: Connection, stream_id: int, data: bytes | memoryview) -> int:
    """Queue as much of ``data`` as the peer's credit allows on a stream (no waiting); bytes queued."""
    n = min(len(data), conn._mux.send_window(stream_id))
    if n:
        conn._mux.send_data(stream_id, data[:n])
        conn._flush()
    return n


async def partial_messages(host: Host, addr: str, protocol: str, *, streams: int, declared: int, send: int, seconds: float) -> int:
    """Attack 1: open ``streams`` streams, each declaring a ``declared``-byte message and sending up to
    ``send`` bytes of it, for at most ``seconds``, taking whatever credit the node grants. Returns the
    body bytes the node accepted (credit it granted) over all streams; the streams are reset at the end."""
    conn = await host.connect(addr)
    opened = [conn.open_stream(protocol) for _ in range(streams)]
    sent = {s.stream_id: 0 for s in opened}
    body = memoryview(bytes(MAX_DATA_PAYLOAD * 4))
    for s in opened:
        _send_raw(conn, s.stream_id, declared.to_bytes(LENGTH_PREFIX_BYTES, "big"))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline and not conn.is_closed:
        progressed = False
        for s in opened:
            if s.is_closed:
                continue
            left = send - sent[s.stream_id]
            if left > 0:
                n = _send_raw(conn, s.stream_id, body[: min(left, len(body))])
                sent[s.stream_id] += n
                progressed |= n > 0
        if conn._write_paused:
            await conn._wait_writable()
        await asyncio.sleep(0 if progressed else 0.05)
        if all(sent[s.stream_id] >= send for s in opened):
            break
    for s in opened:
        s.reset()
    return sum(sent.values())


async def half_open_connections(host: str, port: int, count: int, *, send: bytes = b"") -> list[socket.socket]:
    """Attack 2: ``count`` TCP connections that never finish a handshake (optionally sending ``send``)."""
    socks = []
    loop = asyncio.get_running_loop()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (host, port))
            if send:
                await loop.sock_sendall(sock, send)
        except OSError:
            sock.close()
            continue
        socks.append(sock)
    return socks


async def silent_streams(host: Host, addr: str, protocol: str, count: int) -> list:
    """Attack 5: ``count`` streams that never send a first message."""
    conn = await host.connect(addr)
    opened = []
    for _ in range(count):
        try:
            opened.append(conn.open_stream(protocol))
        except Exception:
            break
    conn._flush()
    return opened


def fresh_host(swarm_key: bytes | None) -> Host:
    return Host(Identity.generate(), swarm_key=swarm_key)
