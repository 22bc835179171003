"""The /biopetals/weights/1 server over real loopback connections (spec/weights.md §3)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil

import pytest

from support_models import make_tiny_checkpoint

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.protocol.manifest import MANIFEST_FILE, MiB, parse_manifest
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.protocol.weights import (
    WEIGHTS_PROTOCOL,
    ChunkData,
    Error,
    GetChunk,
    GetManifest,
    ManifestData,
    decode_weights_message,
    encode_weights_message,
)
from biopetals.transport.host import Host
from biopetals.weights.build import build_manifest
from biopetals.weights.limits import ServeLimits
from biopetals.weights.local import LocalWeights
from biopetals.weights.server import WeightsServer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("w") / "tiny", num_layers=2, hidden_size=256,
                                intermediate_size=1024, max_shard_size="2MB")
    (path / MANIFEST_FILE).write_bytes(build_manifest(path, chunk_size=MiB))
    return path


async def _with_server(directory, limits, body, key=None):
    key = key or SwarmKey.generate()
    manifest = parse_manifest((directory / MANIFEST_FILE).read_bytes())
    async with Host(Identity.generate(), swarm_key=key) as server_host, Host(Identity.generate(), swarm_key=key) as client:
        await server_host.listen("127.0.0.1", 0)
        server = WeightsServer(server_host, LocalWeights(manifest, directory), limits)
        server.install()

        async def ask(message_or_bytes):
            raw = message_or_bytes if isinstance(message_or_bytes, bytes) else encode_weights_message(message_or_bytes)
            return decode_weights_message(await client.call(str(server_host.addrs[0]), WEIGHTS_PROTOCOL, raw, timeout=30))

        await body(ask, manifest, server)


def test_server_answers_manifest_and_verified_chunks(checkpoint):
    async def body(ask, manifest, server):
        reply = await ask(GetManifest(model=manifest.swarm_name))
        assert isinstance(reply, ManifestData) and reply.manifest == manifest.raw
        for part in range(len(manifest.parts)):
            for index, digest in enumerate(manifest.parts[part].chunks):
                reply = await ask(GetChunk(manifest_hash=manifest.hash, part=part, index=index))
                assert isinstance(reply, ChunkData) and (reply.part, reply.index) == (part, index)
                assert hashlib.sha256(reply.data).digest() == digest
        assert server.chunks_served == sum(len(p.chunks) for p in manifest.parts)

    asyncio.run(_with_server(checkpoint, ServeLimits(), body))


def test_server_refuses_what_it_cannot_serve(checkpoint, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", MANIFEST_FILE):
        shutil.copy(checkpoint / name, partial / name)  # a manifest, no tensors: holds nothing but nothing breaks

    async def body(ask, manifest, server):
        cases = [
            (GetManifest(model="other.0123456789abcdef"), ErrorCode.MODEL_MISMATCH),
            (GetChunk(manifest_hash=bytes(32), part=0, index=0), ErrorCode.MODEL_MISMATCH),
            (GetChunk(manifest_hash=manifest.hash, part=len(manifest.parts), index=0), ErrorCode.INVALID_FIELD),
            (GetChunk(manifest_hash=manifest.hash, part=0, index=len(manifest.parts[0].chunks)), ErrorCode.INVALID_FIELD),
            (GetChunk(manifest_hash=manifest.hash, part=0, index=0), ErrorCode.NOT_HELD),
            (b"\x93\x01\x02", ErrorCode.MALFORMED),
            (encode_weights_message(ChunkData(part=0, index=0, data=b"x")), ErrorCode.UNKNOWN_MESSAGE),
        ]
        for request, code in cases:
            reply = await ask(request)
            assert isinstance(reply, Error) and reply.code == code, (request, reply)
        # still serving after all that
        assert isinstance(await ask(GetManifest(model=manifest.swarm_name)), ManifestData)

    asyncio.run(_with_server(partial, ServeLimits(), body))


def test_server_does_not_serve_a_corrupt_local_copy(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    manifest = parse_manifest((copy / MANIFEST_FILE).read_bytes())
    # flip one byte inside block 1's first tensor, wherever it is stored
    from biopetals.weights.local import tensor_locations

    path, loc = tensor_locations(copy)[manifest.parts[1].tensors[0].name]
    with open(path, "r+b") as f:
        f.seek(loc.start + 3)
        byte = f.read(1)
        f.seek(loc.start + 3)
        f.write(bytes([byte[0] ^ 0x10]))

    async def body(ask, manifest, server):
        reply = await ask(GetChunk(manifest_hash=manifest.hash, part=1, index=0))
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_HELD and "not usable" in reply.message
        assert 1 not in server.local.held and 0 in server.local.held  # no longer offered; block 0 still is
        assert isinstance(await ask(GetChunk(manifest_hash=manifest.hash, part=0, index=0)), ChunkData)

    asyncio.run(_with_server(copy, ServeLimits(), body))


def test_busy_beyond_per_peer_limit(checkpoint):
    async def body(ask, manifest, server):
        # 1 MB/s: the second chunk of a peer waits ~1 s, holding its slot
        requests = [ask(GetChunk(manifest_hash=manifest.hash, part=0, index=i % len(manifest.parts[0].chunks)))
                    for i in range(4)]
        replies = await asyncio.gather(*requests)
        busy = [r for r in replies if isinstance(r, Error)]
        chunks = [r for r in replies if isinstance(r, ChunkData)]
        assert len(chunks) == 2 and len(busy) == 2 and all(r.code == ErrorCode.BUSY for r in busy)
        assert server.state.refused == 2 and server.state.total == 0

    asyncio.run(_with_server(checkpoint, ServeLimits(per_peer=2, rate=1e6), body))


def test_many_identities_from_one_address_share_its_limit(checkpoint):
    """Issue 21 (item 7): identities are free, so the per-peer limit alone is bypassed by making more;
    ``per_address`` bounds the calls in flight from one source address (here 127.0.0.1), whoever signs them."""

    key = SwarmKey.generate()

    async def body(ask, manifest, server):
        async with Host(Identity.generate(), swarm_key=key) as b, Host(Identity.generate(), swarm_key=key) as c:
            chunk = GetChunk(manifest_hash=manifest.hash, part=0, index=0)

            async def ask_as(host):
                raw = await host.call(str(server.host.addrs[0]), WEIGHTS_PROTOCOL, encode_weights_message(chunk), timeout=30)
                return decode_weights_message(raw)

            # connected, and the address's 1 MB/s spent: every chunk served next waits ~1 s, holding its slot
            assert all(isinstance(r, ChunkData) for r in [await ask(chunk), await ask_as(b), await ask_as(c)])
            replies = await asyncio.gather(ask(chunk), ask(chunk), ask_as(b), ask_as(b), ask_as(c), ask_as(c))
        chunks = sum(isinstance(r, ChunkData) for r in replies)
        busy = sum(isinstance(r, Error) and r.code == ErrorCode.BUSY for r in replies)
        assert (chunks, busy) == (3, 3) and server.state.by_address == {} and server.state.total == 0

    asyncio.run(_with_server(checkpoint, ServeLimits(per_peer=2, per_address=3, rate=1e6), body, key))


def test_fetch_gives_up_with_a_clear_error_when_nobody_serves_a_part(checkpoint, tmp_path):
    """A provider that holds nothing the fetcher needs: FetchError after the stall timeout, naming the parts."""
    from biopetals.dht.node import DHT
    from biopetals.weights.fetch import FetchError, fetch_parts
    from biopetals.weights.server import ProviderAnnouncer

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(checkpoint / "config.json", partial / "config.json")
    shutil.copy(checkpoint / MANIFEST_FILE, partial / MANIFEST_FILE)
    manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
    for entry in manifest.parts[manifest.files_part].files:  # it holds the files part only
        shutil.copy(checkpoint / entry.name, partial / entry.name)

    async def run():
        key = SwarmKey.generate()
        async with Host(Identity.generate(), swarm_key=key) as host_a, Host(Identity.generate(), swarm_key=key) as host_b:
            await host_a.listen("127.0.0.1", 0)
            async with DHT(host_a) as dht_a:
                local = LocalWeights(manifest, partial)
                assert local.held == [manifest.files_part]
                WeightsServer(host_a, local).install()
                assert await ProviderAnnouncer(dht_a, local, tuple(str(a) for a in host_a.addrs)).announce()
                async with DHT(host_b, initial_peers=[str(host_a.addrs[0])], client_mode=True) as dht_b:
                    with pytest.raises(FetchError) as error:
                        await fetch_parts(host_b, dht_b, manifest, tmp_path / "out", [0, manifest.files_part],
                                          stall_timeout=1.5, refresh_interval=0.2, progress=False)
                    return str(error.value)

    message = asyncio.run(run())
    assert "no reachable peer serves block.0" in message and "1 providers found" in message
    # what did arrive is kept: the files part was finished
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()


def test_a_shard_removed_while_serving_is_answered_not_held(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    manifest = parse_manifest((copy / MANIFEST_FILE).read_bytes())
    from biopetals.weights.local import tensor_locations

    path, _ = tensor_locations(copy)[manifest.parts[1].tensors[-1].name]

    async def body(ask, manifest, server):
        assert 1 in server.local.held
        path.unlink()  # after start-up: the node still thinks it holds block 1
        last = len(manifest.parts[1].chunks) - 1
        reply = await ask(GetChunk(manifest_hash=manifest.hash, part=1, index=last))
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_HELD
        assert 1 not in server.local.held  # and it no longer offers it
        assert isinstance(await ask(GetManifest(model=manifest.swarm_name)), ManifestData)

    asyncio.run(_with_server(copy, ServeLimits(), body))
