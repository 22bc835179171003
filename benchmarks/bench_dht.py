"""DHT over real loopback: get latency across 10 `biopetals-dht` processes, memory per stored record.

Starts 10 DHT node processes (the CLI) with a swarm key on 127.0.0.1, joins them
from this process as a client (a DHT in client mode over a real transport Host),
stores records, then times ``get`` (one key) and ``get_many`` (32 keys, one
traversal). Memory per record is measured with tracemalloc on a ``Storage`` filled
with signed records of typical (100-byte) and maximal (1024-byte) values.

    .venv/bin/python benchmarks/bench_dht.py [--nodes 10] [--gets 200]
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from biopetals.dht.ids import block_key
from biopetals.dht.node import DHT
from biopetals.dht.records import sign_record, to_ms
from biopetals.dht.storage import Storage
from biopetals.protocol.identity import Identity
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.host import Host
from biopetals.transport.keyfiles import write_swarm_key


def _start(key: Path, initial: list[str]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "biopetals.dht.cli", "--swarm-key", str(key), "--host", "127.0.0.1", "--port", "0"]
    if initial:
        args += ["--initial-peers", *initial]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    return proc, proc.stdout.readline().decode().strip()  # type: ignore[union-attr]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _latency(key: Path, addrs: list[str], gets: int) -> dict[str, float]:
    model = "bench/Llama-3-8B"
    blocks = 32
    async with Host(Identity.generate(), swarm_key=SwarmKey.parse(key.read_bytes())) as host:
        async with DHT(host, initial_peers=addrs[:2], client_mode=True) as dht:
            for i in range(blocks):  # one announcement per block, as a node serving all 32 would
                await dht.store(block_key(model, i), host.peer_id.multihash, b"x" * 100, time.time() + 600)
            rng = random.Random(0)
            single = []
            for _ in range(gets):
                start = time.perf_counter()
                found = await dht.get(block_key(model, rng.randrange(blocks)))
                single.append(time.perf_counter() - start)
                assert found, "record not found"
            many = []
            keys = [block_key(model, i) for i in range(blocks)]
            for _ in range(max(gets // 10, 5)):
                start = time.perf_counter()
                found_many = await dht.get_many(keys)
                many.append(time.perf_counter() - start)
                assert all(found_many.values())
    return {
        "get_median_ms": 1000 * statistics.median(single),
        "get_p99_ms": 1000 * _pct(single, 0.99),
        "get_many32_median_ms": 1000 * statistics.median(many),
        "get_many32_p99_ms": 1000 * _pct(many, 0.99),
    }


def _memory(records: int, value_bytes: int) -> float:
    identities = [Identity.from_private_bytes(bytes([i + 1]) * 32) for i in range(64)]
    now = 1.7e9
    signed = [
        sign_record(identities[i % 64], block_key("bench/model", i // 64), identities[i % 64].peer_id.multihash,
                    os.urandom(value_bytes), to_ms(now + 600))
        for i in range(records)
    ]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    storage = Storage(max_records=records + 1)
    for r in signed:
        storage.put(r, now)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # The records' own bytes were allocated before tracing: add them (a node decodes them off the wire).
    own = sum(sys.getsizeof(x) for r in signed[:1000] for x in (r, r.key, r.subkey, r.value, r.public_key, r.signature))
    return used / records + own / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--gets", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "lab.key"
        write_swarm_key(key, SwarmKey.generate())
        procs, addrs = [], []
        try:
            proc, addr = _start(key, [])
            procs.append(proc)
            addrs.append(addr)
            for _ in range(args.nodes - 1):
                proc, addr = _start(key, [addrs[0]])
                procs.append(proc)
                addrs.append(addr)
            time.sleep(1.0)
            lat = asyncio.run(_latency(key, addrs, args.gets))
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    print(f"| measure ({args.nodes} loopback node processes, 2-core machine) | value |")
    print("|---|---|")
    print(f"| get, one key: median | {lat['get_median_ms']:.1f} ms |")
    print(f"| get, one key: p99 | {lat['get_p99_ms']:.1f} ms |")
    print(f"| get_many, 32 keys in one traversal: median | {lat['get_many32_median_ms']:.1f} ms |")
    print(f"| get_many, 32 keys in one traversal: p99 | {lat['get_many32_p99_ms']:.1f} ms |")
    for value_bytes in (100, 1024):
        print(f"| memory per stored record, {value_bytes}-byte value | {_memory(20000, value_bytes):.0f} B |")


if __name__ == "__main__":
    main()
