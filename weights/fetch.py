"""The fetcher: a manifest's parts from the swarm's weights providers, verified chunk by chunk.

``fetch_manifest`` asks providers found in the DHT for the manifest of a swarm name and
keeps the first whose hash matches the name's digits. ``fetch_parts`` finds providers
(``ProviderRecord`` s under ``"<name>.weights"``), resumes whatever partial files the
directory holds (weights/store.py), then keeps ``per_peer`` ``GetChunk`` calls in flight
at every provider (weights/plan.py decides which); every chunk is hashed before it is
written; a peer that sends a bad chunk is avoided for the rest of the fetch. When no
usable provider holds a needed part, the DHT is read again every few seconds (and every
30 s anyway, for newcomers). When no chunk has arrived for ``stall_timeout`` seconds -
nobody serves a part, or every provider fails - ``FetchError`` says which parts are
missing and the providers' last errors; every call has a deadline (``chunk_timeout``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.manifest import Manifest, parse_manifest
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.weights import (
    WEIGHTS_PROTOCOL,
    ChunkData,
    Error,
    GetChunk,
    GetManifest,
    ManifestData,
    ProviderRecord,
    decode_provider,
    decode_weights_message,
    encode_weights_message,
    provider_key,
)

from .plan import FetchPlan
from .store import PartFiles

__all__ = ["FetchError", "FetchReport", "find_providers", "fetch_manifest", "fetch_parts"]

log = logging.getLogger("biopetals.weights")


class FetchError(RuntimeError):
    """The weights could not be fetched; the message says what is missing and what to do."""


@dataclass
class FetchReport:
    parts: list[int]
    chunks_total: int = 0
    chunks_on_disk: int = 0  # verified on disk when the fetch started (resumed)
    chunks_fetched: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0
    bad_chunks: int = 0
    duplicates: int = 0  # endgame requests (a chunk asked of a second peer near the end)
    avoided: list[str] = field(default_factory=list)  # peers that sent bad chunks
    by_peer: dict[str, int] = field(default_factory=dict)  # chunks each peer delivered

    def line(self) -> str:
        rate = self.bytes_fetched / self.seconds / 1e6 if self.seconds > 0 else 0.0
        return (f"fetched {self.chunks_fetched} chunks ({self.bytes_fetched / 1e6:.1f} MB) in {self.seconds:.1f} s "
                f"({rate:.1f} MB/s) from {len(self.by_peer)} peers; {self.chunks_on_disk} of {self.chunks_total} "
                f"chunks already verified on disk; {self.bad_chunks} bad chunks"
                + (f" (avoided {', '.join(self.avoided)})" if self.avoided else ""))


async def find_providers(dht: Any, host: Any, manifest_hash: bytes | None, model: str) -> dict[PeerId, ProviderRecord]:
    """Providers of ``model`` from the DHT (only those with ``manifest_hash``, when given); their
    addresses are handed to ``host`` so that they can be dialled by peer id."""
    out = {}
    for subkey, (value, _) in (await dht.get(provider_key(model))).items():
        try:
            peer = PeerId.from_bytes(subkey)
            record = decode_provider(value)
        except (ProtocolError, ValueError) as exc:
            log.debug("ignoring a provider record: %s", exc)
            continue
        if peer == host.peer_id or (manifest_hash is not None and record.manifest_hash != manifest_hash):
            continue
        for addr in record.addrs:
            try:
                host.add_address(peer, Multiaddr.parse(addr))
                break
            except (ProtocolError, ValueError):
                continue
        out[peer] = record
    return out


async def _ask(host: Any, peer: PeerId, message: Any, timeout: float) -> Any:
    reply = decode_weights_message(await host.call(peer, WEIGHTS_PROTOCOL, encode_weights_message(message),
                                                   timeout=timeout))
    if isinstance(reply, Error):
        raise reply.to_exception()
    return reply


async def fetch_manifest(host: Any, dht: Any, name: str, *, timeout: float = 30.0, stall_timeout: float = 60.0) -> Manifest:
    """The manifest whose swarm name is ``name``, from any provider (checked against the name)."""
    deadline = time.monotonic() + stall_timeout
    errors: list[str] = []
    while True:
        providers = await find_providers(dht, host, None, name)
        for peer in providers:
            try:
                reply = await _ask(host, peer, GetManifest(model=name), timeout)
                if not isinstance(reply, ManifestData):
                    raise FetchError(f"answered {type(reply).__name__}")
                manifest = parse_manifest(reply.manifest)
            except (ProtocolError, OSError, FetchError, asyncio.TimeoutError) as exc:
                errors.append(f"{peer}: {exc}")
                continue
            if manifest.swarm_name == name:
                return manifest
            errors.append(f"{peer}: sent a manifest named {manifest.swarm_name}, not {name}")
        if time.monotonic() >= deadline:
            raise FetchError(
                f"no peer gave the manifest of {name} ({len(providers)} providers found"
                + (f"; {'; '.join(errors[-3:])}" if errors else "")
                + "): check the name, the swarm key and --initial-peers, or pass the manifest file instead")
        await asyncio.sleep(2.0)


async def fetch_parts(
    host: Any,
    dht: Any,
    manifest: Manifest,
    directory: str | os.PathLike,
    parts: list[int],
    *,
    per_peer: int = 4,
    chunk_timeout: float = 60.0,
    stall_timeout: float = 60.0,
    refresh_interval: float = 5.0,
    progress: bool = True,
    on_part_done: Callable[[int], None] = lambda part: None,
) -> FetchReport:
    """Fetch ``parts`` of ``manifest`` into ``directory``; returns what happened. Raises ``FetchError``."""
    started = time.monotonic()
    files = PartFiles(manifest, directory)
    local = files.local()
    report = FetchReport(parts=sorted(set(parts)))
    todo: list[tuple[int, int]] = []
    left_in_part: dict[int, int] = {}
    loop = asyncio.get_running_loop()
    for part in report.parts:
        report.chunks_total += len(manifest.parts[part].chunks)
        if local.holds(part):
            report.chunks_on_disk += len(manifest.parts[part].chunks)
            continue
        missing = await loop.run_in_executor(None, files.resume, part)
        report.chunks_on_disk += len(manifest.parts[part].chunks) - len(missing)
        if not missing:
            await loop.run_in_executor(None, files.finish, part)
            on_part_done(part)
            continue
        left_in_part[part] = len(missing)
        todo += [(part, index) for index in missing]
    if not todo:
        report.seconds = time.monotonic() - started
        return report
    size_of = {chunk: (lambda r: r[1] - r[0])(manifest.chunk_range(*chunk)) for chunk in todo}
    bar = _progress_bar(sum(size_of.values()), manifest, report.parts) if progress else None
    plan = FetchPlan(todo, per_peer=per_peer)
    tasks: dict[asyncio.Task, tuple[PeerId, tuple[int, int]]] = {}
    refreshed_at = -1e18
    last_progress = time.monotonic()
    last_error: dict[PeerId, str] = {}
    try:
        while not plan.finished:
            now = time.monotonic()
            if now - last_progress > stall_timeout:
                raise FetchError(_stalled(manifest, plan, last_error, stall_timeout))
            # read the providers again when some part has none, and now and then for newcomers
            if (now - refreshed_at >= refresh_interval and (not plan.usable() or plan.unavailable_parts())
                    or now - refreshed_at >= 6 * refresh_interval):
                refreshed_at = now
                for peer, record in (await find_providers(dht, host, manifest.hash, manifest.swarm_name)).items():
                    plan.set_providers(peer, [p for p in record.parts() if p < len(manifest.parts)])
            for peer, chunk in plan.next_requests(time.monotonic()):
                task = asyncio.create_task(_ask(host, peer, GetChunk(manifest_hash=manifest.hash, part=chunk[0],
                                                                     index=chunk[1]), chunk_timeout))
                tasks[task] = (peer, chunk)
            if not tasks:
                wake = plan.next_wake(time.monotonic())
                await asyncio.sleep(min(1.0, max(0.05, (wake or 0) - time.monotonic())) if wake else 0.5)
                continue
            done, _ = await asyncio.wait(tasks, timeout=refresh_interval, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                peer, chunk = tasks.pop(task)
                if task.cancelled() or plan.is_complete(chunk):
                    plan.cancelled(peer, chunk)  # another peer delivered it first (endgame)
                    continue
                if peer in plan.banned:
                    continue  # its chunks were requeued when it was banned
                try:
                    reply = task.result()
                except (ProtocolError, OSError, asyncio.TimeoutError) as exc:
                    if getattr(exc, "code", None) == ErrorCode.BUSY:
                        plan.busy(peer, chunk, time.monotonic())
                        continue
                    log.info("chunk %s from %s failed: %s", chunk, peer, exc)
                    last_error[peer] = str(exc) or type(exc).__name__
                    plan.failed(peer, chunk, time.monotonic())
                    continue
                if not isinstance(reply, ChunkData) or (reply.part, reply.index) != chunk:
                    plan.bad(peer, chunk)
                    report.bad_chunks += 1
                    report.avoided.append(str(peer))
                    log.warning("peer %s answered chunk %s with something else; avoiding it", peer, chunk)
                    continue
                data = reply.data
                expected = manifest.parts[chunk[0]].chunks[chunk[1]]
                # hashed and (when right) written in one hop to a worker thread; two endgame copies
                # of a chunk both write the same verified bytes, which is harmless
                good = len(data) == size_of[chunk] and await loop.run_in_executor(
                    None, _verify_and_write, files, chunk, data, expected)
                if not good:
                    plan.bad(peer, chunk)
                    report.bad_chunks += 1
                    report.avoided.append(str(peer))
                    log.warning("peer %s sent a corrupted chunk (part %s, chunk %d: hash mismatch); avoiding it",
                                peer, manifest.parts[chunk[0]].name, chunk[1])
                    continue
                if plan.is_complete(chunk):  # the other endgame copy was faster
                    plan.cancelled(peer, chunk)
                    continue
                last_progress = time.monotonic()
                for other in plan.done(peer, chunk):
                    for pending, (at, what) in tasks.items():
                        if at == other and what == chunk:
                            pending.cancel()
                report.chunks_fetched += 1
                report.bytes_fetched += len(data)
                report.by_peer[str(peer)] = report.by_peer.get(str(peer), 0) + 1
                if bar is not None:
                    bar.update(len(data))
                    bar.set_postfix(peers=len(plan.usable()), avoided=len(plan.banned), refresh=False)
                left_in_part[chunk[0]] -= 1
                if left_in_part[chunk[0]] == 0:
                    await loop.run_in_executor(None, files.finish, chunk[0])
                    on_part_done(chunk[0])
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if bar is not None:
            bar.close()
    report.seconds = time.monotonic() - started
    report.duplicates = plan.duplicates
    return report


def _verify_and_write(files: PartFiles, chunk: tuple[int, int], data: bytes, expected: bytes) -> bool:
    if hashlib.sha256(data).digest() != expected:
        return False
    files.write(chunk[0], chunk[1], data)
    return True


def _stalled(manifest: Manifest, plan: FetchPlan, last_error: dict, seconds: float) -> str:
    """What to tell the user when no chunk arrived for ``seconds``."""
    missing = plan.unavailable_parts()
    if missing:
        names = ", ".join(manifest.parts[p].name for p in missing[:8]) + (" …" if len(missing) > 8 else "")
        what = f"no reachable peer serves {names} of {manifest.swarm_name}"
    else:
        what = f"no chunk of {manifest.swarm_name} arrived for {seconds:.0f} s"
    errors = "; ".join(f"{peer}: {error}" for peer, error in list(last_error.items())[-3:])
    return (f"{what} ({len(plan.usable())} providers found, {len(plan.banned)} avoided for bad chunks"
            + (f"; last errors: {errors}" if errors else "")
            + "): start a node that holds these parts, or check the swarm key and --initial-peers")


def _progress_bar(total: int, manifest: Manifest, parts: list[int]):
    from tqdm.auto import tqdm

    blocks = [p for p in parts if p < manifest.num_blocks]
    what = [f"blocks {blocks[0]}:{blocks[-1] + 1}"] if blocks else []
    what += [manifest.parts[p].name for p in parts if p >= manifest.num_blocks]
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"fetching {', '.join(what)}",
                mininterval=0.5)


def default_weights_dir(swarm_name: str) -> Path:
    """Where fetched weights go without ``--weights-dir``: ``$BIOPETALS_CACHE`` or ``~/.cache/biopetals``."""
    root = os.environ.get("BIOPETALS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "biopetals")
    return Path(root) / "models" / swarm_name
