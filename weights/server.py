"""Serving weights: the ``/biopetals/weights/1`` handler and the provider records (spec/weights.md §3-§4).

``WeightsServer.install()`` answers ``GetManifest`` and ``GetChunk`` from a ``LocalWeights``,
within ``ServeLimits`` (per peer, per source address and in total); chunk reads (file I/O and the first hash) run on a small thread pool
of their own, so they never wait behind a model step. A malformed request gets an ``Error``
reply and the peer is served again on its next request. ``ProviderAnnouncer`` stores the
node's ``ProviderRecord`` under ``"<swarm name>.weights"`` and refreshes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from biopetals.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from biopetals.protocol.messages import error_from_exception
from biopetals.protocol.weights import (
    MAX_PROVIDER_RANGES,
    REQUESTS,
    WEIGHTS_PROTOCOL,
    ChunkData,
    Error,
    GetChunk,
    GetManifest,
    ManifestData,
    ProviderRecord,
    decode_weights_message,
    encode_provider,
    encode_weights_message,
    part_ranges,
    provider_key,
)

from .limits import LimitState, ServeLimits
from .local import CorruptCopy, LocalWeights

__all__ = ["WeightsServer", "ProviderAnnouncer"]

log = logging.getLogger("biopetals.weights")


def _error(code: ErrorCode, message: str) -> bytes:
    return encode_weights_message(Error(code=code, message=message[:1000]))


class WeightsServer:
    """Answers weights requests for one manifest from ``local``."""

    def __init__(self, host: Any, local: LocalWeights, limits: ServeLimits = ServeLimits(), *,
                 clock=time.monotonic) -> None:
        self.host = host
        self.local = local
        self.state = LimitState(limits)
        self.clock = clock
        self.chunks_served = 0
        self.bytes_served = 0
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="weights")

    def install(self) -> None:
        self.host.set_handler(WEIGHTS_PROTOCOL, self.handle)

    def close(self) -> None:
        self.host.remove_handler(WEIGHTS_PROTOCOL)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def handle(self, peer_id: Any, request: bytes) -> bytes:
        try:
            message = decode_weights_message(request, REQUESTS)
        except RemoteProtocolError as exc:
            return encode_weights_message(error_from_exception(exc))
        manifest = self.local.manifest
        if isinstance(message, GetManifest):
            if message.model != manifest.swarm_name:
                return _error(ErrorCode.MODEL_MISMATCH, f"this peer holds {manifest.swarm_name}, not {message.model}")
            return encode_weights_message(ManifestData(manifest=manifest.raw))
        assert isinstance(message, GetChunk)
        if message.manifest_hash != manifest.hash:
            return _error(ErrorCode.MODEL_MISMATCH, f"this peer holds the manifest {manifest.hash.hex()[:16]}… "
                                                    f"({manifest.swarm_name}), not {message.manifest_hash.hex()[:16]}…")
        if message.part >= len(manifest.parts):
            return _error(ErrorCode.INVALID_FIELD, f"part {message.part}: the manifest has {len(manifest.parts)} parts")
        if message.index >= len(manifest.parts[message.part].chunks):
            return _error(ErrorCode.INVALID_FIELD, f"chunk {message.index}: part {message.part} has "
                                                   f"{len(manifest.parts[message.part].chunks)} chunks")
        if not self.local.holds(message.part):
            return _error(ErrorCode.NOT_HELD, f"this peer does not hold part {manifest.parts[message.part].name}")
        peer = bytes(peer_id.multihash)
        conn = self.host.connection(peer_id)
        address = conn.remote_address[0] if conn is not None and conn.remote_address else None
        if not self.state.acquire(peer, address):
            return _error(ErrorCode.BUSY, "too many chunk requests in flight; ask another peer or retry later")
        try:
            loop = asyncio.get_running_loop()
            try:
                data = await loop.run_in_executor(self._pool, self.local.read_chunk, message.part, message.index)
            except (KeyError, CorruptCopy) as exc:
                return _error(ErrorCode.NOT_HELD, f"this peer's copy of part {message.part} is not usable: {exc}")
            except Exception:  # a bug of ours: an answer, not a reset stream
                log.exception("serving chunk %d of part %d failed", message.index, message.part)
                return _error(ErrorCode.INTERNAL, "internal error reading the chunk; ask another peer")
            wait = self.state.delay(peer, len(data), self.clock(), address)
            if wait > 0:
                await asyncio.sleep(wait)
            self.chunks_served += 1
            self.bytes_served += len(data)
            return encode_weights_message(ChunkData(part=message.part, index=message.index, data=data))
        except ProtocolError as exc:
            return encode_weights_message(error_from_exception(exc))
        finally:
            self.state.release(peer, address)


class ProviderAnnouncer:
    """Stores "this peer serves these parts" in the DHT every ``interval`` seconds."""

    def __init__(self, dht: Any, local: LocalWeights, addrs: tuple[str, ...], *, interval: float = 60.0,
                 clock=time.time) -> None:
        self.dht = dht
        self.local = local
        self.addrs = tuple(addrs)[:8]
        self.interval = interval
        self.clock = clock

    async def announce(self) -> bool:
        held = self.local.held
        if not held:
            return False
        # a record lists at most MAX_PROVIDER_RANGES ranges: a peer holding scattered parts offers the first ones
        ranges = part_ranges(held)[:2 * MAX_PROVIDER_RANGES]
        record = ProviderRecord(manifest_hash=self.local.manifest.hash, ranges=ranges, addrs=self.addrs)
        expiration = self.clock() + max(3 * self.interval, 30.0)
        result = await self.dht.store(provider_key(self.local.manifest.swarm_name), self.dht.host.peer_id.multihash,
                                      encode_provider(record), expiration)
        return bool(result.accepted)

    async def run(self) -> None:
        while True:
            try:
                await self.announce()
            except Exception as exc:  # the DHT may be briefly unreachable: try again next time
                log.warning("announcing weights failed: %s", exc)
            await asyncio.sleep(self.interval)
