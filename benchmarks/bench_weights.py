"""Weights from the swarm: MB/s of fetching a span from 1, 2 and 3 loopback providers vs a local copy.

* providers: ``biopetals-node`` processes on 127.0.0.1 started from one checkpoint
  directory that holds a ``biopetals-manifest.json``; each serves every part the directory
  holds (``/biopetals/weights/1``) and announces itself in the DHT. Each node loads only
  block 0 (``--blocks 0:1``): what it serves does not depend on its span;
* fetcher: ``weights.fetch.fetch_parts`` in this process, with a Host and a client-mode DHT
  of its own (``per_peer`` requests in flight at each provider, every chunk SHA-256-verified
  before it is written, part files fsynced and renamed when complete). Timed: the fetch
  itself (finding providers in the DHT, the chunk calls, hashing, writing), into a fresh
  directory each time, after the providers' connections are up; not process start-up;
* local copy: ``shutil.copyfile`` of the fetched part files (the same bytes), warm page cache;
* hashing: SHA-256 of an in-memory buffer in 4 MiB chunks (one hash per chunk, as the
  manifest does), seconds per GB on one core; and ``build_manifest`` (what
  ``biopetals-manifest`` runs) over the whole checkpoint, in bytes/s.

Everything shares this machine's cores: the fetcher, its hashing and every provider; the
table gives the CPU seconds each side spent during the fetch (the fetcher process, all its
threads; the provider processes together, from /proc).
Model: the bundled SmolLM2-135M-Instruct (fp32, 30 blocks), its files hard-linked (or
copied) into a temporary directory that gets the manifest; ``--tiny`` uses a small random
checkpoint (4 blocks, 1 MiB chunks) to check the benchmark itself in seconds. Prints markdown tables.

    .venv/bin/python benchmarks/bench_weights.py [--blocks 0:30] [--chunk-mib 4] [--repeats 3] [--providers 1 2 3]
    .venv/bin/python benchmarks/bench_weights.py --tiny
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from biopetals.client.local_swarm import LocalSwarm
from biopetals.dht.node import DHT
from biopetals.protocol.identity import Identity
from biopetals.protocol.manifest import MANIFEST_FILE, MiB, Manifest, parse_manifest
from biopetals.protocol.weights import (
    WEIGHTS_PROTOCOL, GetManifest, ManifestData, decode_weights_message, encode_weights_message)
from biopetals.transport.host import Host
from biopetals.transport.keyfiles import load_swarm_key
from biopetals.weights.build import build_manifest, checkpoint_bytes
from biopetals.weights.fetch import FetchReport, fetch_parts, find_providers
from biopetals.weights.store import part_file_name

HASH_CHUNK = 4 * MiB
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of processes ``pids`` so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / _TICKS


# ---------------------------------------------------------------------------- checkpoint


def make_tiny(path: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support_models import make_tiny_checkpoint

    return make_tiny_checkpoint(path, num_layers=4, hidden_size=256, intermediate_size=1024,
                                max_shard_size="5MB")


def link_or_copy(src: Path, dst: Path) -> str:
    """Every file of ``src`` into ``dst`` (created): hard links where possible, else copies."""
    dst.mkdir(parents=True)
    how = "hard-linked"
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == MANIFEST_FILE:
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
            how = "copied"
    return how


def manifest_build(directory: Path, chunk_size: int, repeats: int) -> tuple[Manifest, float, list[float]]:
    """Build and write the manifest ``repeats`` times: (manifest, bytes covered, seconds of each run)."""
    total = checkpoint_bytes(directory)
    times, raw = [], b""
    for _ in range(repeats):
        t = time.perf_counter()
        raw = build_manifest(directory, chunk_size=chunk_size)
        times.append(time.perf_counter() - t)
    (directory / MANIFEST_FILE).write_bytes(raw)
    return parse_manifest(raw), total, times


# ---------------------------------------------------------------------------- hashing and copying


def sha256_seconds_per_gb(size: int, repeats: int) -> float:
    import numpy as np

    buf = memoryview(np.random.default_rng(0).bytes(size))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for off in range(0, size, HASH_CHUNK):
            hashlib.sha256(buf[off:off + HASH_CHUNK]).digest()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / (size / 1e9)


def copy_seconds(files: list[Path], dst: Path) -> float:
    dst.mkdir(parents=True)
    t = time.perf_counter()
    for f in files:
        shutil.copyfile(f, dst / f.name)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst)
    return seconds


# ---------------------------------------------------------------------------- fetching


async def fetch_runs(swarm: LocalSwarm, manifest: Manifest, parts: list[int], n_providers: int, work: Path,
                     repeats: int, per_peer: int, copy_runs: list[float]) -> list[FetchReport]:
    """``repeats`` timed fetches of ``parts`` from the swarm's ``n_providers`` providers, each into a fresh
    directory; the first fetched directory's part files are also copied (``copy_runs``) while warm."""
    key = load_swarm_key(swarm.key_path)
    pids = [node.process.pid for node in swarm.nodes]
    reports = []
    async with Host(Identity.generate(), swarm_key=key) as host:
        async with DHT(host, initial_peers=swarm.initial_peers, client_mode=True) as dht:
            deadline = time.monotonic() + 60
            while True:  # every provider's record is in the DHT
                providers = await find_providers(dht, host, manifest.hash, manifest.swarm_name)
                if len(providers) >= n_providers:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {len(providers)} of {n_providers} providers in the DHT after 60 s")
                await asyncio.sleep(0.5)
            for peer in providers:  # connections up before the timed runs (a Noise handshake each)
                reply = decode_weights_message(await host.call(
                    peer, WEIGHTS_PROTOCOL, encode_weights_message(GetManifest(model=manifest.swarm_name)), timeout=30))
                assert isinstance(reply, ManifestData) and reply.manifest == manifest.raw
            for r in range(repeats):
                out = work / f"fetch-{n_providers}-{r}"
                cpu, node_cpu = time.process_time(), cpu_of(pids)
                report = await fetch_parts(host, dht, manifest, out, parts, per_peer=per_peer, progress=False)
                report.cpu_seconds = time.process_time() - cpu  # this process, all its threads
                report.node_cpu_seconds = cpu_of(pids) - node_cpu  # the providers together
                if report.chunks_fetched != report.chunks_total:
                    raise RuntimeError(f"fetch {r}: {report.line()}")
                reports.append(report)
                files = [out / part_file_name(manifest, p) for p in parts]
                missing = [f for f in files if not f.is_file()]
                if missing:
                    raise RuntimeError(f"fetch {r}: {missing[0]} not written")
                if len(copy_runs) < repeats:
                    copy_runs.append(copy_seconds(files, work / "copy"))
                shutil.rmtree(out)
                print(f"  {n_providers} provider(s), run {r + 1}: {report.line()}", file=sys.stderr, flush=True)
    return reports


def _blocks(text: str) -> tuple[int, int]:
    start, end = (int(x) for x in text.split(":"))
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start, end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=_blocks, default=None, metavar="A:B", help="the span to fetch (default: all blocks)")
    p.add_argument("--chunk-mib", type=int, default=None,
                   help="manifest chunk size in MiB, a power of two from 1 to 16 (default 4; 1 with --tiny)")
    p.add_argument("--repeats", type=int, default=3, help="timed fetches per provider count (median; default 3)")
    p.add_argument("--providers", type=int, nargs="+", default=[1, 2, 3], help="provider counts (default 1 2 3)")
    p.add_argument("--per-peer", type=int, default=4,
                   help="chunk requests in flight per provider (default 4); the nodes get --weights-per-peer to match")
    p.add_argument("--node-limit", type=int, default=None, metavar="N",
                   help="the nodes' --weights-per-peer (default: --per-peer, at least 4); lower than --per-peer "
                        "shows how the fetcher adapts to BUSY")
    p.add_argument("--hash-mib", type=int, default=256, help="in-memory buffer for the SHA-256 line (default 256)")
    p.add_argument("--tiny", action="store_true", help="a small random checkpoint (4 blocks), for a quick check")
    args = p.parse_args(argv)
    if args.chunk_mib is None:
        args.chunk_mib = 1 if args.tiny else 4
    if not (1 <= args.chunk_mib <= 16 and args.chunk_mib & (args.chunk_mib - 1) == 0):
        p.error(f"--chunk-mib {args.chunk_mib}: need a power of two from 1 to 16")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`/kill: still stop the nodes, remove files
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-weights-"))
    try:
        ckpt = work / ("tiny-llama" if args.tiny else "SmolLM2-135M-Instruct")  # the manifest's name comes from it
        if args.tiny:
            name = "tiny random Llama (4 x 256)"
            make_tiny(ckpt)
            how = "written"
        else:
            from biopetals.models.smollm2 import smollm2_path

            name = "SmolLM2-135M"
            how = link_or_copy(Path(smollm2_path()), ckpt)
        manifest, total, build_times = manifest_build(ckpt, args.chunk_mib * MiB, args.repeats)
        start, end = args.blocks or (0, manifest.num_blocks)
        if end > manifest.num_blocks:
            p.error(f"--blocks {start}:{end}: the model has {manifest.num_blocks} blocks")
        parts = list(range(start, end))
        span_bytes = sum(manifest.parts[i].size for i in parts)
        chunks = sum(len(manifest.parts[i].chunks) for i in parts)
        print(f"  {name}: checkpoint {how}, manifest {manifest.swarm_name}; span {start}:{end} = "
              f"{span_bytes / 1e6:.1f} MB in {chunks} chunks", file=sys.stderr, flush=True)

        rows = []
        copy_runs: list[float] = []
        with LocalSwarm(ckpt, [], extra_args=["--weights-per-peer", str(args.node_limit or max(4, args.per_peer))]) as swarm:
            for n in sorted(args.providers):
                while len(swarm.nodes) < n:
                    swarm.add_node(0, 1)
                reports = asyncio.run(fetch_runs(swarm, manifest, parts, n, work, args.repeats, args.per_peer,
                                                 copy_runs))
                reports.sort(key=lambda r: r.seconds)
                middle = reports[len(reports) // 2]  # the median run (its chunk spread too)
                rows.append((n, middle.seconds, sorted(middle.by_peer.values(), reverse=True),
                             statistics.median(r.cpu_seconds for r in reports),
                             statistics.median(r.node_cpu_seconds for r in reports)))
        copy_s = statistics.median(copy_runs)
        sha_s_per_gb = sha256_seconds_per_gb(args.hash_mib * MiB, args.repeats)

        mb = span_bytes / 1e6
        print(f"\n| model | span | providers | MB/s | seconds | vs local copy | CPU s fetcher | CPU s providers "
              f"| chunks per provider |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for n, seconds, spread, cpu, node_cpu in rows:
            print(f"| {name} | {start}:{end} ({mb:.0f} MB) | {n} | {mb / seconds:.0f} | {seconds:.2f} | "
                  f"{100 * copy_s / seconds:.0f}% | {cpu:.2f} | {node_cpu:.2f} | {' / '.join(map(str, spread))} |")
        print(f"| {name} | {start}:{end} ({mb:.0f} MB) | local copy (warm cache) | {mb / copy_s:.0f} | "
              f"{copy_s:.2f} | 100% | — | — | — |")
        first, rest = build_times[0], build_times[1:] or build_times
        print(f"\n| CPU cost | value |\n|---|---|")
        print(f"| SHA-256, 4 MiB chunks, one core | {sha_s_per_gb:.2f} s/GB ({1000 / sha_s_per_gb:.0f} MB/s) |")
        print(f"| SHA-256 of the span ({mb:.0f} MB), once | {sha_s_per_gb * span_bytes / 1e9:.2f} s |")
        print(f"| build_manifest (biopetals-manifest), {total / 1e6:.0f} MB checkpoint, {args.chunk_mib} MiB chunks | "
              f"{total / 1e6 / statistics.median(rest):.0f} MB/s ({statistics.median(rest):.2f} s; first run "
              f"{first:.2f} s) |")
        print(f"\n{os.cpu_count()} cores, {len(rows) and max(row[0] for row in rows)} node processes at most (each "
              f"loads block 0 only), fetcher in this process; {args.chunk_mib} MiB chunks, {args.per_peer} requests "
              f"in flight per provider; median of {args.repeats} fetches, each into a fresh directory (chunks "
              f"SHA-256-verified, parts fsynced); local copy = shutil.copyfile of the fetched part files, "
              f"warm page cache; CPU s = CPU time during the fetch of this process (all threads) and of all provider processes (median); total {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
