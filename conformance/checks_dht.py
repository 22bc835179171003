"""DHT checks: PING, STORE with valid and invalid records, FIND_NODE, FIND_VALUE (spec/dht.md §3-§7).

Requests are built with the DHT's message and record codecs (pure codecs, no node
logic); what the responder must answer comes from spec/dht.md's tables and the
``request``/``record`` vectors of spec/vectors/dht.json. Records are written under
random keys, so runs never disturb a real swarm's announcements.
"""

from __future__ import annotations

import hashlib
import os
import time


from biopetals.conformance.context import DHT_PROTOCOL
from biopetals.conformance.registry import Failed, check
from biopetals.conformance.vectors import load_or_stub, slug as _slug, spec_of as _spec_of
from biopetals.dht import messages as dm
from biopetals.dht.ids import peer_id_of_public_key
from biopetals.dht.records import Record, sign_record
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity

D = "spec/dht.md "
MAX_TTL_MS = 3600_000  # spec/dht.md §2
CLOCK_SKEW_MS = 30_000
K = 20


def _now_ms() -> int:
    return int(time.time() * 1000)


async def dht_call(ctx, data: bytes):
    raw = await ctx.call(DHT_PROTOCOL, data, timeout=10)
    try:
        return dm.decode_response(raw), raw
    except Exception as exc:
        raise Failed(f"response does not decode by spec/dht.md §7: {exc}", sent=data, received=raw) from None


def expect_dht_error(reply, code, sent=None, raw=None):
    want = ErrorCode(code)
    if not isinstance(reply, dm.ErrorResponse) or reply.code != want:
        got = f"ERROR {reply.code}" if isinstance(reply, dm.ErrorResponse) else type(reply).__name__
        raise Failed(f"expected ERROR {want.name} ({int(want)}), got {got}", sent=sent, received=raw or reply)


def _record(identity=None, *, key=None, subkey=None, value=b"conformance", ttl_ms=60_000, expiration=None):
    identity = identity or Identity.generate()
    key = key or f"conformance/{os.urandom(8).hex()}.0"
    subkey = peer_id_of_public_key(identity.public_key) if subkey is None else subkey
    exp = expiration if expiration is not None else _now_ms() + ttl_ms
    return sign_record(identity, key, subkey, value, exp)


async def _store(ctx, *records: Record, sender: Identity | None = None):
    """STORE ``records``; from ``sender``'s own connection if given (a node MAY accept a peer-id
    subkey's record only from its signer, spec/dht.md §5.4, and the reference does)."""
    data = dm.encode(dm.StoreRequest(tuple(records)))
    if sender is None:
        reply, raw = await dht_call(ctx, data)
    else:
        from biopetals.transport.host import Host

        async with Host(sender, swarm_key=ctx.key_bytes) as host:
            raw = await host.call(ctx.addr, DHT_PROTOCOL, data, timeout=10)
        reply = dm.decode_response(raw)
    if not isinstance(reply, dm.StoreResponse) or len(reply.statuses) != len(records):
        raise Failed("expected a STORE response with one status per record (§7.2)", sent=data, received=raw)
    return reply.statuses, data


async def _find(ctx, key: str) -> list[Record]:
    kid = hashlib.sha256(key.encode()).digest()
    data = dm.encode(dm.FindValueRequest((kid,)))
    reply, raw = await dht_call(ctx, data)
    if not isinstance(reply, dm.FindValueResponse) or len(reply.results) != 1:
        raise Failed("expected a FIND_VALUE response with one result (§7.4)", sent=data, received=raw)
    for r in reply.results[0].records:
        if hashlib.sha256(r.key.encode()).digest() != kid:
            raise Failed("FIND_VALUE returned a record under another key (§4)", received=r)
    return list(reply.results[0].records)


def _expect_status(statuses, code, data):
    if statuses[0] != int(code):
        name = ErrorCode(code).name if code else "OK"
        raise Failed(f"STORE status {statuses[0]}, expected {int(code)} ({name})", sent=data, received=statuses)


async def _refused(ctx, rec: Record, code):
    """STORE of ``rec`` gets status ``code``, and FIND_VALUE does not return it (§4: MUST NOT store)."""
    statuses, data = await _store(ctx, rec)
    _expect_status(statuses, code, data)
    if await _find(ctx, rec.key):
        raise Failed(f"a record refused with {ErrorCode(code).name} is returned by FIND_VALUE")


@check("dht.ping", D + "§7.1, §3", "PING is answered by a PING response (canonical bytes 81 00 02)")
async def ping(ctx):
    data = dm.encode(dm.PingRequest())
    reply, raw = await dht_call(ctx, data)
    if not isinstance(reply, dm.PingResponse):
        raise Failed("expected PING response", sent=data, received=raw)
    if raw != b"\x81\x00\x02":
        raise Failed("PING response not canonical (§3: keys ascending, shortest forms)", sent=data, received=raw)


@check("dht.store.find", D + "§4, §5.1, §7.2, §7.4", "a valid record is stored (status 0) and returned as stored, signature included")
async def store_find(ctx):
    ident = Identity.generate()
    rec = _record(ident)
    statuses, data = await _store(ctx, rec, sender=ident)
    _expect_status(statuses, 0, data)
    found = await _find(ctx, rec.key)
    if rec not in found:
        raise Failed("FIND_VALUE does not return the stored record unchanged", received=found)


@check("dht.store.expired", D + "§4.3", "a record with expiration <= now: status RECORD_EXPIRED, not stored")
async def store_expired(ctx):
    await _refused(ctx, _record(expiration=_now_ms() - 60_000), ErrorCode.RECORD_EXPIRED)


@check("dht.store.too-far", D + "§4.4", "expiration beyond now + MAX_TTL + CLOCK_SKEW: status EXPIRATION_TOO_FAR")
async def store_too_far(ctx):
    rec = _record(ttl_ms=MAX_TTL_MS + CLOCK_SKEW_MS + 600_000)
    statuses, data = await _store(ctx, rec)
    _expect_status(statuses, ErrorCode.EXPIRATION_TOO_FAR, data)


@check("dht.store.bad-signature", D + "§4.5", "a record altered after signing: status BAD_SIGNATURE, not stored")
async def store_bad_sig(ctx):
    rec = _record()
    await _refused(ctx, Record(rec.key, rec.subkey, b"altered", rec.expiration, rec.public_key, rec.signature), ErrorCode.BAD_SIGNATURE)


@check("dht.store.forged-subkey", D + "§4.6", "peer A's subkey signed by peer B: status BAD_SIGNATURE")
async def store_forged(ctx):
    a, b = Identity.generate(), Identity.generate()
    rec = _record(b, subkey=peer_id_of_public_key(a.public_key))
    statuses, data = await _store(ctx, rec)
    _expect_status(statuses, ErrorCode.BAD_SIGNATURE, data)


@check("dht.store.older-ignored", D + "§5.2", "a record with an earlier expiration than the stored one: status 0, no effect")
async def store_older(ctx):
    ident = Identity.generate()
    key = f"conformance/{os.urandom(8).hex()}.0"
    new = _record(ident, key=key, value=b"new", ttl_ms=120_000)
    old = _record(ident, key=key, value=b"old", ttl_ms=60_000)
    statuses, data = await _store(ctx, new, sender=ident)
    _expect_status(statuses, 0, data)
    statuses, data = await _store(ctx, old, sender=ident)
    _expect_status(statuses, 0, data)
    found = await _find(ctx, key)
    if [r.value for r in found] != [b"new"]:
        raise Failed("the older record replaced the newer one", received=found)


@check("dht.store.open-subkey-owner", D + "§5.2", "an open subkey belongs to its first writer: another signer gets BAD_SIGNATURE")
async def store_open_subkey(ctx):
    key = f"conformance/{os.urandom(8).hex()}.0"
    first = _record(key=key, subkey=b"open", ttl_ms=60_000)
    other = _record(key=key, subkey=b"open", ttl_ms=120_000)
    statuses, data = await _store(ctx, first)
    _expect_status(statuses, 0, data)
    statuses, data = await _store(ctx, other)
    _expect_status(statuses, ErrorCode.BAD_SIGNATURE, data)


@check("dht.find-node", D + "§7.3, §3.1", "FIND_NODE: at most K valid contacts, never the requester (sent without addresses, so never in its table)")
async def find_node(ctx):
    data = dm.encode(dm.FindNodeRequest(os.urandom(32)))
    reply, raw = await dht_call(ctx, data)
    if not isinstance(reply, dm.FindNodeResponse):
        raise Failed("expected FIND_NODE response", sent=data, received=raw)
    if len(reply.contacts) > K:
        raise Failed(f"{len(reply.contacts)} contacts, more than K = {K}", received=raw)
    host = await ctx.host()
    me = host.peer_id.to_bytes() if hasattr(host.peer_id, "to_bytes") else None
    if me and any(c.peer_id == me for c in reply.contacts):
        raise Failed("the requester is among the contacts (§7.3)", received=raw)
    return f"{len(reply.contacts)} contacts"


@check("dht.find-value.unknown-key", D + "§7.4", "FIND_VALUE for a key nobody stored: no records, one result per key")
async def find_unknown(ctx):
    found = await _find(ctx, f"conformance/{os.urandom(8).hex()}.0")
    if found:
        raise Failed("records returned for a key never stored", received=found)


def _register_vectors():
    doc = load_or_stub("dht.json", check, "dht.vectors", D + "§3")
    if doc is None:
        return
    for v in doc["invalid"]:
        data = bytes.fromhex(v["hex"])
        if v["decoder"] == "request" and data:
            what = "as a request"
        elif v["decoder"] == "record" and v["error"] in ("RECORD_INVALID", "RECORD_TOO_LARGE"):
            # a record that does not decode fails the whole STORE (§7.2)
            data = b"\x83\x00\x03\x01\x90\x02\x91" + data
            what = "inside a STORE"
        else:
            continue
        code = ErrorCode[v["error"]]

        async def run(ctx, data=data, code=code):
            reply, raw = await dht_call(ctx, data)
            expect_dht_error(reply, code, sent=data, raw=raw)

        check(f"dht.vector.{_slug(v['name'])}", _spec_of(v["rule"], D),
              f"invalid vector {v['name']!r} {what}: ERROR {v['error']}")(run)


_register_vectors()
