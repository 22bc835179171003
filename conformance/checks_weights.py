"""Weights checks: ``/biopetals/weights/1`` and the provider record, as a fetcher sees them (spec/weights.md §2-§4).

The model's swarm name is ``--model`` or the ``model`` of the peer's NodeInfo. A peer that
serves no weights (it answers ``UNKNOWN_PROTOCOL`` for ``/biopetals/weights/1``: a node
started without a manifest, a DHT-only peer) gets "n/a" for all of them. Expected answers
come from the table of §3.3 and the ``message`` vectors of spec/vectors/weights.json; the
manifest is checked with the spec's parser and every chunk against its SHA-256, never
against our node's code.
"""

from __future__ import annotations

import asyncio
import hashlib

from biopetals.conformance.context import DHT_PROTOCOL
from biopetals.conformance.registry import Failed, NotApplicable, check
from biopetals.conformance.vectors import envelope_type, load_or_stub, slug as _slug, spec_of as _spec_of
from biopetals.dht import messages as dm
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import PeerId
from biopetals.protocol.manifest import is_swarm_name, parse_manifest
from biopetals.protocol.messages import Error
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.weights import (
    MAX_CHUNK_INDEX, MAX_PART, WEIGHTS_PROTOCOL, ChunkData, GetChunk, GetManifest, ManifestData,
    decode_provider, decode_weights_message, encode_weights_message, provider_key,
)
from biopetals.transport.errors import StreamResetError

W = "spec/weights.md "
#: what the chunk check fetches at most from one part
MAX_CHECKED_CHUNKS = 8
MAX_CHECKED_BYTES = 64 << 20


# ----------------------------------------------------------------------------- helpers


def _code_name(code: int) -> str:
    return ErrorCode(code).name if code in ErrorCode._value2member_map_ else "?"


def expect_error(reply, code, *, sent=None, raw=None):
    want = ErrorCode(code)
    if not isinstance(reply, Error):
        raise Failed(f"expected Error {want.name} ({int(want)}), got {type(reply).__name__}", sent=sent, received=raw or reply)
    if reply.code != want:
        raise Failed(f"expected Error {want.name} ({int(want)}), got {_code_name(reply.code)} ({reply.code}): {reply.message!r}",
                     sent=sent, received=raw or reply)


async def _raw_call(ctx, data: bytes, timeout: float = 10.0) -> bytes:
    try:
        return await ctx.call(WEIGHTS_PROTOCOL, data, timeout=timeout)
    except StreamResetError as exc:
        if exc.code == ErrorCode.UNKNOWN_PROTOCOL:
            raise NotApplicable(f"the peer serves no {WEIGHTS_PROTOCOL} (started without a manifest)") from None
        raise


async def wcall(ctx, data: bytes, timeout: float = 10.0):
    """One weights call on a fresh stream: (decoded reply, raw reply); the reply decodes by §3.1 or the check fails."""
    raw = await _raw_call(ctx, data, timeout)
    try:
        return decode_weights_message(raw), raw
    except Exception as exc:
        raise Failed(f"reply does not decode by spec/weights.md §3.1: {exc}", sent=data, received=raw) from None


class _Served:
    """What the peer serves: its swarm name, and the manifest it answered for that name."""

    def __init__(self, name: str, raw: bytes, manifest) -> None:
        self.name, self.raw, self.manifest = name, raw, manifest


async def model_name(ctx) -> str:
    if ctx.model:
        return ctx.model
    try:
        info = await ctx.node_info()
    except NotApplicable:
        # a peer with no node protocol: serves weights only if asked by name (--model)
        raise NotApplicable("no model name: the peer serves no node protocol and --model was not given") from None
    return info.model


async def served(ctx) -> _Served:
    """GetManifest(swarm name) answered by a manifest that parses and has that swarm name (§2.4, §3.3); cached."""
    cached = getattr(ctx, "_weights_served", None)
    if isinstance(cached, BaseException):
        raise cached
    if cached is not None:
        return cached
    try:
        result = await _get_served(ctx)
    except (Failed, NotApplicable) as exc:
        ctx._weights_served = exc
        raise
    ctx._weights_served = result
    return result


async def _get_served(ctx) -> _Served:
    name = await model_name(ctx)
    data = encode_weights_message(GetManifest(model=name))
    reply, raw = await wcall(ctx, data)
    if not isinstance(reply, ManifestData):
        if isinstance(reply, Error):
            raise Failed(f"GetManifest with the peer's model {name!r} answered Error {_code_name(reply.code)}: {reply.message!r}",
                         sent=data, received=raw)
        raise Failed(f"GetManifest answered {type(reply).__name__}, expected ManifestData", sent=data, received=raw)
    try:
        manifest = parse_manifest(reply.manifest)
    except Exception as exc:
        raise Failed(f"the manifest does not parse by §2.5: {exc}", sent=data, received=reply.manifest) from None
    if manifest.swarm_name != name:
        raise Failed(f"asked for {name!r}, got the manifest of {manifest.swarm_name!r} (§2.4: name and SHA-256 must agree)",
                     sent=data, received=reply.manifest[:200])
    return _Served(name, reply.manifest, manifest)


def _peer_subkey(ctx) -> bytes:
    return Multiaddr.parse(ctx.addr).peer_id.multihash


async def _find_records(ctx, key: str, addr: str | None = None):
    """FIND_VALUE for ``key`` at the peer (or ``addr``): (records, contacts); (None, ()) if it serves no DHT."""
    kid = hashlib.sha256(key.encode()).digest()
    data = dm.encode(dm.FindValueRequest((kid,)))
    try:
        if addr is None:
            raw = await ctx.call(DHT_PROTOCOL, data, timeout=10)
        else:
            host = await ctx.host()
            raw = await host.call(addr, DHT_PROTOCOL, data, timeout=5)
        reply = dm.decode_response(raw)
    except Exception:
        return None, ()
    if not isinstance(reply, dm.FindValueResponse) or len(reply.results) != 1:
        return None, ()
    return list(reply.results[0].records), reply.results[0].contacts


async def provider_record(ctx, name: str, *, wait: float = 0.0):
    """The peer's own record under ``"<name>.weights"`` (subkey: its peer id), as stored bytes, or None.

    Asked of the peer itself, then of the contacts it returns (one hop: where a swarm keeps it).
    """
    key, subkey = provider_key(name), _peer_subkey(ctx)
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while True:
        records, contacts = await _find_records(ctx, key)
        mine = [r for r in records or () if r.subkey == subkey]
        if not mine:
            for c in list(contacts)[:8]:
                for a in c.addrs[:1]:
                    addr = a if "/p2p/" in a else f"{a}/p2p/{PeerId.from_bytes(c.peer_id)}"
                    try:
                        found, _ = await asyncio.wait_for(_find_records(ctx, key, addr), 6)
                    except Exception:  # a timeout or an unreachable contact: the next one
                        continue
                    mine += [r for r in found or () if r.subkey == subkey]
        if mine:
            return max(mine, key=lambda r: r.expiration)
        if loop.time() >= end:
            return None
        await asyncio.sleep(0.5)


async def _get_chunk(ctx, manifest_hash: bytes, part: int, index: int):
    data = encode_weights_message(GetChunk(manifest_hash=manifest_hash, part=part, index=index))
    reply, raw = await wcall(ctx, data, timeout=30)
    return reply, raw, data


async def held_part(ctx, s: _Served) -> tuple[int, str]:
    """A part the peer serves (with at least one chunk): from its provider record, else the first not NOT_HELD."""
    parts = s.manifest.parts
    record = await provider_record(ctx, s.name)
    if record is not None:
        try:
            listed = decode_provider(record.value).parts()
        except Exception:
            listed = []
        listed = [p for p in listed if p < len(parts) and parts[p].chunks]
        if listed:
            return listed[0], "listed in its provider record"
    for p in range(len(parts)):
        if not parts[p].chunks:
            continue
        reply, raw, data = await _get_chunk(ctx, s.manifest.hash, p, 0)
        if isinstance(reply, Error) and reply.code in (ErrorCode.NOT_HELD, ErrorCode.BUSY):
            continue
        return p, "the first part not answered NOT_HELD"
    raise NotApplicable("the peer holds none of the manifest's parts (every part answered NOT_HELD)")


# ----------------------------------------------------------------------------- manifest


@check("weights.manifest.by-name", W + "§3.3, §2.4",
       "GetManifest with the peer's swarm name: ManifestData whose bytes parse (§2.5) and hash to that name")
async def manifest_by_name(ctx):
    s = await served(ctx)
    return f"{s.name}: {len(s.raw)} bytes, {len(s.manifest.parts)} parts"


@check("weights.manifest.other-name", W + "§3.3", "GetManifest with another swarm name: Error MODEL_MISMATCH")
async def manifest_other_name(ctx):
    s = await served(ctx)
    digits = s.name[-16:]
    other = s.name[:-16] + ("0" * 16 if digits != "0" * 16 else "1" * 16)
    if not is_swarm_name(s.name):
        other = s.name + ".0000000000000000"
    data = encode_weights_message(GetManifest(model=other))
    reply, raw = await wcall(ctx, data)
    expect_error(reply, ErrorCode.MODEL_MISMATCH, sent=data, raw=raw)


# ----------------------------------------------------------------------------- chunks


@check("weights.chunk.hashes", W + "§3.3, §2.2",
       f"GetChunk for the chunks of a held part (at most {MAX_CHECKED_CHUNKS}): ChunkData with the same part "
       "and index, the chunk's length and the manifest's SHA-256", timeout=90)
async def chunk_hashes(ctx):
    s = await served(ctx)
    m = s.manifest
    part, why = await held_part(ctx, s)
    hashes = m.parts[part].chunks
    checked = total = 0
    for index, want in enumerate(hashes):
        start, end = m.chunk_range(part, index)
        if checked >= MAX_CHECKED_CHUNKS or (checked and total + end - start > MAX_CHECKED_BYTES):
            break
        reply, raw, data = await _get_chunk(ctx, m.hash, part, index)
        if isinstance(reply, Error) and reply.code == ErrorCode.BUSY:
            await asyncio.sleep(0.5)  # a limit of §3.4 (another client's calls): ask once more
            reply, raw, data = await _get_chunk(ctx, m.hash, part, index)
        if not isinstance(reply, ChunkData):
            what = f"Error {_code_name(reply.code)}: {reply.message!r}" if isinstance(reply, Error) else type(reply).__name__
            raise Failed(f"GetChunk part {part} ({m.parts[part].name}, {why}) chunk {index}: {what}", sent=data, received=raw[:200])
        if (reply.part, reply.index) != (part, index):
            raise Failed(f"asked for part {part} chunk {index}, got part {reply.part} chunk {reply.index}", sent=data, received=raw[:200])
        if len(reply.data) != end - start:
            raise Failed(f"part {part} chunk {index}: {len(reply.data)} bytes, the manifest's chunk has {end - start} (§2.2)",
                         sent=data, received=raw[:200])
        got = hashlib.sha256(reply.data).digest()
        if got != want:
            raise Failed(f"part {part} chunk {index}: SHA-256 {got.hex()[:16]}…, the manifest says {want.hex()[:16]}… "
                         "(§3.3: a server verifies a chunk before it serves it)", sent=data, received=raw[:200])
        checked += 1
        total += len(reply.data)
    return f"part {part} ({m.parts[part].name}, {why}): {checked} of {len(hashes)} chunks, {total} bytes verified"


@check("weights.chunk.wrong-manifest", W + "§3.3", "GetChunk with another manifest_hash: Error MODEL_MISMATCH")
async def chunk_wrong_manifest(ctx):
    s = await served(ctx)
    other = bytes(b ^ 0xFF for b in s.manifest.hash)
    part = next((p.index for p in s.manifest.parts if p.chunks), 0)
    reply, raw, data = await _get_chunk(ctx, other, part, 0)
    expect_error(reply, ErrorCode.MODEL_MISMATCH, sent=data, raw=raw)


@check("weights.chunk.part-out-of-range", W + "§3.3", "GetChunk for part = the manifest's number of parts: Error INVALID_FIELD")
async def chunk_part_range(ctx):
    s = await served(ctx)
    n = len(s.manifest.parts)
    if n > MAX_PART:
        raise NotApplicable(f"the manifest has {n} parts: part {n} cannot be sent (§3.2)")
    reply, raw, data = await _get_chunk(ctx, s.manifest.hash, n, 0)
    expect_error(reply, ErrorCode.INVALID_FIELD, sent=data, raw=raw)


@check("weights.chunk.index-out-of-range", W + "§3.3", "GetChunk for index = the part's number of chunks: Error INVALID_FIELD")
async def chunk_index_range(ctx):
    s = await served(ctx)
    part = next((p for p in s.manifest.parts if len(p.chunks) <= MAX_CHUNK_INDEX), None)
    if part is None:
        raise NotApplicable("every part has 16384 chunks: no index past the end can be sent (§3.2)")
    reply, raw, data = await _get_chunk(ctx, s.manifest.hash, part.index, len(part.chunks))
    expect_error(reply, ErrorCode.INVALID_FIELD, sent=data, raw=raw)


@check("weights.reply-as-request", W + "§3.1, §3.2",
       "a reply type sent as a request (ChunkData): Error UNKNOWN_MESSAGE, then a valid GetManifest is still answered")
async def reply_as_request(ctx):
    s = await served(ctx)
    data = encode_weights_message(ChunkData(part=0, index=0, data=b"\x00" * 16))
    reply, raw = await wcall(ctx, data)
    expect_error(reply, ErrorCode.UNKNOWN_MESSAGE, sent=data, raw=raw)
    data = encode_weights_message(GetManifest(model=s.name))
    reply, raw = await wcall(ctx, data)
    if not isinstance(reply, ManifestData) or reply.manifest != s.raw:
        raise Failed("after a reply type, a valid GetManifest was not answered by the same manifest", sent=data, received=raw[:200])


# ----------------------------------------------------------------------------- the invalid vectors


REQUEST_TYPES = {GetManifest.TYPE, GetChunk.TYPE}
REPLY_TYPES = {ManifestData.TYPE, ChunkData.TYPE, Error.TYPE}
ENVELOPE_STEPS = ("step 2", "step 3", "step 4", "step 5")


def is_request_vector(v: dict) -> bool:
    """A ``message`` vector whose code a server must answer: a request type, an unknown type, or an
    envelope error (§3.1). A reply type with a bad body is UNKNOWN_MESSAGE to a server, not the
    vector's body code, and an empty payload cannot be framed (transport.mux.zero-length-message)."""
    if v.get("kind") != "message":
        return False
    data = bytes.fromhex(v["hex"])
    if not data:
        return False
    mtype = envelope_type(data)
    if any(s in v["rule"] for s in ENVELOPE_STEPS) or mtype is None:
        return True
    return mtype not in REPLY_TYPES


def _register_vectors():
    doc = load_or_stub("weights.json", check, "weights.vectors", W + "§8")
    if doc is None:
        return
    for v in doc["invalid"]:
        if not is_request_vector(v):
            continue
        data = bytes.fromhex(v["hex"])
        code = ErrorCode[v["error"]]

        async def run(ctx, data=data, code=code):
            await served(ctx)
            reply, raw = await wcall(ctx, data)
            expect_error(reply, code, sent=data, raw=raw)

        check(f"weights.vector.{_slug(v['name'], scope='weights')}", _spec_of(v["rule"], W),
              f"invalid vector {v['name']!r} as a request: Error {v['error']}")(run)


_register_vectors()


# ----------------------------------------------------------------------------- provider record


@check("weights.provider.record", W + "§4.1, §4.2",
       "the peer's provider record under \"<swarm name>.weights\" decodes by §4.2 and names the manifest it serves", timeout=30)
async def provider(ctx):
    s = await served(ctx)
    record = await provider_record(ctx, s.name, wait=5.0)
    if record is None:
        raise NotApplicable(f"no provider record of the peer under {provider_key(s.name)!r} (in its DHT or its contacts')")
    try:
        value = decode_provider(record.value)
    except Exception as exc:
        raise Failed(f"the provider record does not decode by §4.2: {exc}", received=record.value) from None
    if value.manifest_hash != s.manifest.hash:
        raise Failed(f"the provider record names manifest {value.manifest_hash.hex()[:16]}…, the peer serves "
                     f"{s.manifest.hash.hex()[:16]}…", received=record.value)
    n = len(s.manifest.parts)
    if value.ranges[-1] > n:
        raise Failed(f"the provider record lists parts up to {value.ranges[-1] - 1}; the manifest has {n}", received=record.value)
    return f"parts {list(value.ranges)}"


@check("weights.still-serves", W + "§3.1", "after every bad request above, the peer still answers a valid GetManifest with its manifest")
async def still_serves(ctx):
    s = await served(ctx)
    data = encode_weights_message(GetManifest(model=s.name))
    reply, raw = await wcall(ctx, data)
    if not isinstance(reply, ManifestData) or reply.manifest != s.raw:
        raise Failed("a valid GetManifest is no longer answered by the manifest", sent=data, received=raw[:200])
