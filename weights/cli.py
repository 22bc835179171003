"""``biopetals-manifest`` and ``biopetals-fetch``.

    biopetals-manifest ./Llama3-OpenBioLLM-8B            # writes ./Llama3-OpenBioLLM-8B/biopetals-manifest.json
    biopetals-fetch llama3-openbiollm-8b.0123456789abcdef --blocks 0:16 --out ./weights \\
        --swarm-key lab.key --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW...

``biopetals-manifest`` prints the swarm name (``<name>.<16 hex digits of the manifest's
SHA-256>``) that nodes started from that directory then announce under. ``biopetals-fetch``
fetches blocks (and with ``--client`` the embeddings, head and tokenizer) ahead of time;
``biopetals-node --model`` and ``from_pretrained`` do the same by themselves.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import logging
import sys
import time
from pathlib import Path

from biopetals.models.config import ModelConfigError
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.manifest import DEFAULT_CHUNK_SIZE, MANIFEST_FILE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, MiB, parse_manifest
from biopetals.transport.errors import expected_failures
from biopetals.transport.keyfiles import KeyFileError, load_swarm_key

from .build import build_manifest, checkpoint_bytes
from .fetch import FetchError
from .source import fetch_blocking, resolve_source
from .store import DirectoryMismatch

__all__ = ["manifest_main", "fetch_main"]


def _chunk_size(text: str) -> int:
    try:
        mib = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of MiB") from None
    size = mib * MiB
    if not (MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE and size & (size - 1) == 0):
        raise argparse.ArgumentTypeError(f"{text!r}: need a power of two from 1 to 16 (MiB)")
    return size


def manifest_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="biopetals-manifest",
        description="Write the weights manifest of a checkpoint (spec/weights.md): every tensor's part, dtype and "
                    "shape and the SHA-256 of every chunk. Nodes started from the directory then serve its chunks to "
                    "peers, and announce under a swarm name that includes the manifest's hash.")
    p.add_argument("checkpoint", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("-o", "--output", help=f"where to write it (default CHECKPOINT/{MANIFEST_FILE})")
    p.add_argument("--chunk-mib", type=_chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="MIB",
                   help=f"chunk size in MiB, a power of two from 1 to 16 (default {DEFAULT_CHUNK_SIZE // MiB})")
    p.add_argument("--name", help="the model's name in the swarm name (default: from the directory or hub name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        directory = Path(args.checkpoint)
        output = Path(args.output) if args.output else directory / MANIFEST_FILE
        started = time.perf_counter()
        bar = None
        if not args.no_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=checkpoint_bytes(directory), unit="B", unit_scale=True, unit_divisor=1024, desc="hashing")
        try:
            raw = build_manifest(directory, chunk_size=args.chunk_mib, name=args.name,
                                 progress=bar.update if bar is not None else (lambda n: None))
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - started
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(raw)
        tmp.replace(output)
        manifest = parse_manifest(raw)
    except (ModelConfigError, OSError, ValueError) as exc:
        print(f"biopetals-manifest: {exc}", file=sys.stderr)
        return 1
    size = sum(part.size for part in manifest.parts)
    chunks = sum(len(part.chunks) for part in manifest.parts)
    print(f"wrote {output} ({len(raw)} bytes): {manifest.num_blocks} blocks, {size / 1e6:.1f} MB in {chunks} chunks "
          f"of {manifest.chunk_size // MiB} MiB, hashed in {seconds:.1f} s")
    print(f"swarm name: {manifest.swarm_name}")
    return 0


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:END, e.g. 0:16") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start, end


def fetch_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="biopetals-fetch",
        description="Fetch a model's weights from the swarm's peers, hash-verified chunk by chunk, into a safetensors "
                    "directory that biopetals-node --model and from_pretrained load from. An interrupted fetch "
                    "resumes: chunks already verified on disk are kept.")
    p.add_argument("model", help="the manifest file, or the swarm name <name>.<16 hex digits> (the manifest is then "
                                 "fetched too), or a directory holding a manifest")
    p.add_argument("--blocks", type=_blocks, metavar="START:END", help="the blocks to fetch (default: none)")
    p.add_argument("--client", action="store_true", help="also the client's parts: embeddings, norm, LM head, tokenizer")
    p.add_argument("--all", action="store_true", help="every part of the model")
    p.add_argument("--out", help="the directory (default $BIOPETALS_CACHE/models/<swarm name>, "
                                 "BIOPETALS_CACHE defaulting to ~/.cache/biopetals)")
    p.add_argument("--swarm-key", required=True, metavar="FILE", help="the swarm key file of the private swarm")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR", help="any peers of the swarm")
    p.add_argument("--per-peer", type=int, default=4, metavar="N", help="chunk requests in flight per peer (default 4)")
    p.add_argument("--stall-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="give up when no peer serves a missing part for this long (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    args = p.parse_args(argv)
    if not (args.blocks or args.client or args.all):
        p.error("say what to fetch: --blocks START:END, --client and/or --all")
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    def parts(manifest):
        if args.all:
            return list(range(len(manifest.parts)))
        wanted = []
        if args.blocks:
            if args.blocks[1] > manifest.num_blocks:
                raise FetchError(f"--blocks {args.blocks[0]}:{args.blocks[1]}: the model has {manifest.num_blocks} blocks")
            wanted += list(range(*args.blocks))
        if args.client:
            wanted += [manifest.client_part, manifest.files_part]
        return wanted

    try:
        source = resolve_source(args.model, args.out)
        report = fetch_blocking(source, parts, initial_peers=args.initial_peers, swarm_key=load_swarm_key(args.swarm_key),
                                progress=not args.no_progress, stall_timeout=args.stall_timeout, per_peer=args.per_peer)
    except BaseException as exc:
        failures = expected_failures(exc, (FetchError, ModelConfigError, DirectoryMismatch, KeyFileError,
                                           ProtocolError, OSError))
        if failures is None:
            raise
        for e in failures:
            print(f"biopetals-fetch: {e}", file=sys.stderr)
        return 1
    print(report.line() if report is not None else "nothing to fetch: every part asked for is already here")
    print(f"DONE {source.directory}")
    return 0
