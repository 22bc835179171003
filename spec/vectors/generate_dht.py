"""Generate spec/vectors/dht.json: every DHT message and record, valid and invalid.

Run from the repository root:  .venv/bin/python spec/vectors/generate_dht.py
(``--check`` exits 1 if the committed file differs from what would be generated).

Every entry names its ``decoder``:

- ``record``           a standalone record (spec/dht.md §3.2); checks rules 4.1-4.2
- ``record_validate``  a record that decodes; validated at ``now_ms`` (rules 4.3-4.6)
- ``request``          a request message (spec/dht.md §7)
- ``response``         a response message (spec/dht.md §7)

Valid entries: encoding ``fields`` gives ``hex`` exactly and decoding ``hex`` gives
``fields``; a valid ``record`` also passes validation at its ``now_ms``. Invalid
entries: decoding (and for ``record_validate``, validating at ``now_ms``) raises
exactly ``error``. Byte strings in fields are hex. Keys are Ed25519 seeds 01..01
(peer A) and 02..02 (peer B); signatures are deterministic (RFC 8032).

``fields_to_message`` / ``message_to_fields`` below are the JSON mapping that
tests/test_vectors_dht.py uses in both directions.

``model_names`` (spec/dht.md §6.1): a checkpoint's ``path`` (the directory, relative to any
root) and its ``config`` (config.json) give the swarm name ``swarm_name``; ``fingerprint_json``
is the canonical JSON whose SHA-256 gives the name's 8 hex digits. Computed here from the rule's
text, not by the reference implementation; the test checks that a real directory agrees.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import msgpack

from biopetals.dht import messages as m
from biopetals.dht import params
from biopetals.dht.records import Record, record_to_obj, sign_record
from biopetals.protocol.identity import Identity

OUT = Path(__file__).with_name("dht.json")

NOW_MS = 1_700_000_000_000
A = Identity.from_private_bytes(bytes([1]) * 32)
B = Identity.from_private_bytes(bytes([2]) * 32)
PA, PB = A.peer_id.multihash, B.peer_id.multihash
ADDR_A = f"/ip4/10.0.0.1/tcp/31337/p2p/{A.peer_id}"
ADDR_B = "/ip4/10.0.0.2/tcp/31337"
KEY = "aaditya/Llama3-OpenBioLLM-8B.0"
KID = bytes.fromhex("00" * 32)  # placeholder replaced below
EXP = NOW_MS + 600_000
HORIZON = NOW_MS + int((params.MAX_TTL + params.CLOCK_SKEW) * 1000)


# --------------------------------------------------------------------------- JSON mapping


def record_to_fields(r: Record) -> dict:
    return {"key": r.key, "subkey": r.subkey.hex(), "value": r.value.hex(), "expiration": r.expiration,
            "public_key": r.public_key.hex(), "signature": r.signature.hex()}


def record_from_fields(f: dict) -> Record:
    return Record(f["key"], bytes.fromhex(f["subkey"]), bytes.fromhex(f["value"]), f["expiration"],
                  bytes.fromhex(f["public_key"]), bytes.fromhex(f["signature"]))


def _contact_fields(c: m.Contact) -> dict:
    return {"peer_id": c.peer_id.hex(), "addrs": list(c.addrs)}


def _contact(f: dict) -> m.Contact:
    return m.Contact(bytes.fromhex(f["peer_id"]), tuple(f["addrs"]))


def message_to_fields(msg: Any) -> dict:
    if isinstance(msg, m.PingRequest):
        return {"type": "PING_REQUEST", "sender_addrs": list(msg.sender_addrs)}
    if isinstance(msg, m.PingResponse):
        return {"type": "PING_RESPONSE"}
    if isinstance(msg, m.StoreRequest):
        return {"type": "STORE_REQUEST", "sender_addrs": list(msg.sender_addrs),
                "records": [record_to_fields(r) for r in msg.records]}
    if isinstance(msg, m.StoreResponse):
        return {"type": "STORE_RESPONSE", "statuses": list(msg.statuses)}
    if isinstance(msg, m.FindNodeRequest):
        return {"type": "FIND_NODE_REQUEST", "sender_addrs": list(msg.sender_addrs), "target": msg.target.hex()}
    if isinstance(msg, m.FindNodeResponse):
        return {"type": "FIND_NODE_RESPONSE", "contacts": [_contact_fields(c) for c in msg.contacts]}
    if isinstance(msg, m.FindValueRequest):
        return {"type": "FIND_VALUE_REQUEST", "sender_addrs": list(msg.sender_addrs), "keys": [k.hex() for k in msg.keys]}
    if isinstance(msg, m.FindValueResponse):
        return {"type": "FIND_VALUE_RESPONSE", "results": [
            {"records": [record_to_fields(r) for r in res.records], "contacts": [_contact_fields(c) for c in res.contacts]}
            for res in msg.results]}
    if isinstance(msg, m.ErrorResponse):
        return {"type": "ERROR", "code": msg.code, "message": msg.message}
    raise TypeError(type(msg))


def fields_to_message(f: dict) -> Any:
    t = f["type"]
    addrs = tuple(f.get("sender_addrs", ()))
    if t == "PING_REQUEST":
        return m.PingRequest(addrs)
    if t == "PING_RESPONSE":
        return m.PingResponse()
    if t == "STORE_REQUEST":
        return m.StoreRequest(tuple(record_from_fields(r) for r in f["records"]), addrs)
    if t == "STORE_RESPONSE":
        return m.StoreResponse(tuple(f["statuses"]))
    if t == "FIND_NODE_REQUEST":
        return m.FindNodeRequest(bytes.fromhex(f["target"]), addrs)
    if t == "FIND_NODE_RESPONSE":
        return m.FindNodeResponse(tuple(_contact(c) for c in f["contacts"]))
    if t == "FIND_VALUE_REQUEST":
        return m.FindValueRequest(tuple(bytes.fromhex(k) for k in f["keys"]), addrs)
    if t == "FIND_VALUE_RESPONSE":
        return m.FindValueResponse(tuple(
            m.KeyResult(tuple(record_from_fields(r) for r in res["records"]), tuple(_contact(c) for c in res["contacts"]))
            for res in f["results"]))
    if t == "ERROR":
        return m.ErrorResponse(f["code"], f["message"])
    raise ValueError(t)


# --------------------------------------------------------------------------- vectors


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _valid() -> list[dict]:
    from biopetals.dht.ids import key_id

    kid = key_id(KEY)
    rec_a = sign_record(A, KEY, PA, b'{"start":0,"end":8}', EXP)
    rec_open = sign_record(B, "aaditya/Llama3-OpenBioLLM-8B", b"config", b"\x01\x02", EXP)
    rec_empty = sign_record(A, "k", b"", b"", NOW_MS + 1)
    rec_max = sign_record(B, "m" * params.MAX_KEY_BYTES, b"s" * params.MAX_SUBKEY_BYTES,
                          b"\xff" * params.MAX_VALUE_BYTES, HORIZON)
    ca, cb = m.Contact(PA, (ADDR_A,)), m.Contact(PB, (ADDR_B, "/ip6/::1/tcp/4001"))
    out = []

    def rec(name: str, r: Record) -> None:
        out.append({"name": name, "decoder": "record", "now_ms": NOW_MS, "fields": record_to_fields(r),
                    "hex": _pack(record_to_obj(r)).hex()})

    def msg(name: str, decoder: str, message: Any) -> None:
        out.append({"name": name, "decoder": decoder, "fields": message_to_fields(message),
                    "hex": m.encode(message).hex()})

    rec("block announcement: subkey = signer's peer id (rule 4.6)", rec_a)
    rec("open subkey signed by anyone", rec_open)
    rec("empty subkey and value, expires 1 ms after now", rec_empty)
    rec("every size at its limit, expiration exactly at the horizon (4.2, 4.4)", rec_max)
    msg("PING request", "request", m.PingRequest((ADDR_A,)))
    msg("PING request from a client (no addresses)", "request", m.PingRequest(()))
    msg("PING response", "response", m.PingResponse())
    msg("STORE request, two records", "request", m.StoreRequest((rec_a, rec_open), (ADDR_A,)))
    msg("STORE response: OK and TOO_MANY_RECORDS", "response", m.StoreResponse((0, 53)))
    msg("FIND_NODE request", "request", m.FindNodeRequest(kid, (ADDR_B,)))
    msg("FIND_NODE response, two contacts", "response", m.FindNodeResponse((ca, cb)))
    msg("FIND_NODE response, no contacts", "response", m.FindNodeResponse(()))
    msg("FIND_VALUE request, two keys", "request", m.FindValueRequest((kid, bytes(range(32))), (ADDR_A,)))
    msg("FIND_VALUE response: records for one key, contacts for the other", "response",
        m.FindValueResponse((m.KeyResult((rec_a,), (cb,)), m.KeyResult((), (ca, cb)))))
    msg("ERROR response", "response", m.ErrorResponse(4, "target must be 32 bytes"))
    return out


def _invalid() -> list[dict]:
    from biopetals.dht.ids import key_id

    kid = key_id(KEY)
    good = sign_record(A, KEY, PA, b"v", EXP)
    g = record_to_obj(good)
    out = []

    def bad(name: str, decoder: str, data: bytes, error: str, rule: str, **extra: Any) -> None:
        out.append({"name": name, "decoder": decoder, **extra, "hex": data.hex(), "error": error, "rule": rule})

    def rec_with(**changes: Any) -> dict:
        return {**g, **{i: changes[n] for i, n in enumerate(
            ("key", "subkey", "value", "expiration", "public_key", "signature")) if n in changes}}

    # ---- records: structure and size (decoder)
    for name, obj, err, rule in [
        ("record is not a map", [1, 2], "RECORD_INVALID", "§3.2 a record is a map"),
        ("signature missing", {i: v for i, v in g.items() if i != 5}, "RECORD_INVALID", "§4.1 every field present"),
        ("key is bin, not str", rec_with(key=b"k"), "RECORD_INVALID", "§4.1 key is str"),
        ("empty key", rec_with(key=""), "RECORD_INVALID", "§4.1 key at least 1 byte"),
        ("subkey is str", rec_with(subkey="x"), "RECORD_INVALID", "§4.1 subkey is bin"),
        ("expiration is a float", rec_with(expiration=1.7e12), "RECORD_INVALID", "§3.2 expiration is uint ms"),
        ("expiration negative", rec_with(expiration=-1), "RECORD_INVALID", "§3.2 expiration 0..2^53-1"),
        ("expiration 2^53", rec_with(expiration=1 << 53), "RECORD_INVALID", "§3.2 expiration 0..2^53-1"),
        ("public key 31 bytes", rec_with(public_key=good.public_key[:31]), "RECORD_INVALID", "§4.1 public_key 32 bytes"),
        ("signature 63 bytes", rec_with(signature=good.signature[:63]), "RECORD_INVALID", "§4.1 signature 64 bytes"),
        ("key of 257 bytes", rec_with(key="k" * 257), "RECORD_TOO_LARGE", "§4.2 MAX_KEY_BYTES"),
        ("subkey of 65 bytes", rec_with(subkey=b"s" * 65), "RECORD_TOO_LARGE", "§4.2 MAX_SUBKEY_BYTES"),
        ("value of 1025 bytes", rec_with(value=b"v" * 1025), "RECORD_TOO_LARGE", "§4.2 MAX_VALUE_BYTES"),
    ]:
        bad(name, "record", _pack(obj), err, rule)
    bad("record: truncated msgpack", "record", _pack(g)[:-3], "MALFORMED", "§3 exactly one msgpack value")

    # ---- records: validation at now (clock and signature)
    def val(name: str, r: Record, err: str, rule: str) -> None:
        bad(name, "record_validate", _pack(record_to_obj(r)), err, rule, now_ms=NOW_MS)

    val("expired: expiration == now", sign_record(A, KEY, PA, b"v", NOW_MS), "RECORD_EXPIRED", "§4.3 expiration > now")
    val("expired an hour ago", sign_record(A, KEY, PA, b"v", NOW_MS - 3_600_000), "RECORD_EXPIRED", "§4.3 expiration > now")
    val("far future: 1 ms past now + MAX_TTL + CLOCK_SKEW", sign_record(A, KEY, PA, b"v", HORIZON + 1),
        "EXPIRATION_TOO_FAR", "§4.4 expiration <= now + (MAX_TTL + CLOCK_SKEW)")
    val("far future: one day", sign_record(A, KEY, PA, b"v", NOW_MS + 86_400_000),
        "EXPIRATION_TOO_FAR", "§4.4 expiration <= now + (MAX_TTL + CLOCK_SKEW)")
    tampered = Record(good.key, good.subkey, b"w", good.expiration, good.public_key, good.signature)
    val("value altered after signing", tampered, "BAD_SIGNATURE", "§4.5 signature verifies")
    moved = Record(good.key, good.subkey, good.value, good.expiration + 1, good.public_key, good.signature)
    val("expiration extended after signing", moved, "BAD_SIGNATURE", "§4.5 signature covers expiration")
    swapped = Record(good.key, good.subkey, good.value, good.expiration, B.public_key, good.signature)
    val("public key swapped", swapped, "BAD_SIGNATURE", "§4.5 signature verifies")
    val("forged: peer A's subkey signed by peer B", sign_record(B, KEY, PA, b"v", EXP),
        "BAD_SIGNATURE", "§4.6 peer-id subkey must be signed by that peer")
    no_domain = Record(good.key, good.subkey, good.value, good.expiration, A.public_key,
                       A.sign(_pack({0: good.key, 1: good.subkey, 2: good.value, 3: good.expiration})))
    val("signed without the domain prefix", no_domain, "BAD_SIGNATURE", "§3.3 domain separation")

    # ---- messages
    addr_ok = [ADDR_B]
    contact = {0: PB, 1: [ADDR_B]}
    for name, dec, data, err, rule in [
        ("empty input", "request", b"", "MALFORMED", "§3 exactly one msgpack value"),
        ("truncated map", "request", _pack({0: 1, 1: addr_ok})[:-2], "MALFORMED", "§3 exactly one msgpack value"),
        ("trailing byte", "request", _pack({0: 1, 1: addr_ok}) + b"\x00", "MALFORMED", "§3 exactly one msgpack value"),
        ("top level is an array", "request", _pack([1, []]), "MALFORMED", "§3 top level is a map"),
        ("string map key", "request", _pack({"0": 1, 1: []}), "MALFORMED", "§3 integer keys"),
        ("invalid UTF-8 in a str", "request", bytes.fromhex("82000101") + b"\x91\xa1\xff", "MALFORMED", "§3 str is UTF-8"),
        ("type missing", "request", _pack({1: []}), "INVALID_FIELD", "§7 key 0 is the type"),
        ("type is a string", "request", _pack({0: "ping", 1: []}), "INVALID_FIELD", "§7 key 0 is the type"),
        ("response type sent as a request", "request", _pack({0: 2}), "UNKNOWN_MESSAGE", "§7 request types"),
        ("unknown type 10", "request", _pack({0: 10, 1: []}), "UNKNOWN_MESSAGE", "§7 request types"),
        ("request type sent as a response", "response", _pack({0: 1, 1: []}), "UNKNOWN_MESSAGE", "§7 response types"),
        ("sender_addrs missing", "request", _pack({0: 1}), "INVALID_FIELD", "§7 key 1 sender_addrs"),
        ("sender_addrs not an array", "request", _pack({0: 1, 1: ADDR_B}), "INVALID_FIELD", "§7 sender_addrs array"),
        ("nine sender addresses", "request", _pack({0: 1, 1: [ADDR_B] * 9}), "LIMIT_EXCEEDED", "§2 MAX_ADDRS"),
        ("address of 257 bytes", "request", _pack({0: 1, 1: ["/dns/" + "a" * 240 + "/tcp/1" + "0" * 6]}),
         "LIMIT_EXCEEDED", "§2 MAX_ADDR_BYTES"),
        ("address that is not a multiaddr", "request", _pack({0: 1, 1: ["/udp/1"]}), "INVALID_FIELD", "§3.1 multiaddr text"),
        ("address is bin", "request", _pack({0: 1, 1: [b"/ip4/1.2.3.4/tcp/1"]}), "INVALID_FIELD", "§3.1 multiaddr is str"),
        ("STORE with no records", "request", _pack({0: 3, 1: addr_ok, 2: []}), "INVALID_FIELD", "§7 1..MAX_RECORDS_PER_STORE"),
        ("STORE with 33 records", "request", _pack({0: 3, 1: addr_ok, 2: [g] * 33}), "LIMIT_EXCEEDED", "§2 MAX_RECORDS_PER_STORE"),
        ("STORE records missing", "request", _pack({0: 3, 1: addr_ok}), "INVALID_FIELD", "§7 records required"),
        ("STORE with an oversized record", "request", _pack({0: 3, 1: addr_ok, 2: [rec_with(value=b"v" * 2000)]}),
         "RECORD_TOO_LARGE", "§7.2 a record breaking 4.2 fails the request"),
        ("STORE with a malformed record", "request", _pack({0: 3, 1: addr_ok, 2: [rec_with(signature=b"")]}),
         "RECORD_INVALID", "§7.2 a record breaking 4.1 fails the request"),
        ("FIND_NODE target of 31 bytes", "request", _pack({0: 5, 1: addr_ok, 2: kid[:31]}), "INVALID_FIELD", "§7 target 32 bytes"),
        ("FIND_NODE target missing", "request", _pack({0: 5, 1: addr_ok}), "INVALID_FIELD", "§7 target required"),
        ("FIND_VALUE with no keys", "request", _pack({0: 7, 1: addr_ok, 2: []}), "INVALID_FIELD", "§7 1..MAX_KEYS_PER_FIND"),
        ("FIND_VALUE with 17 keys", "request", _pack({0: 7, 1: addr_ok, 2: [kid] * 17}), "LIMIT_EXCEEDED", "§2 MAX_KEYS_PER_FIND"),
        ("FIND_VALUE key id of 33 bytes", "request", _pack({0: 7, 1: addr_ok, 2: [kid + b"\0"]}), "INVALID_FIELD", "§7 key ids 32 bytes"),
        ("STORE response status negative", "response", _pack({0: 4, 1: [-1]}), "INVALID_FIELD", "§7 statuses uint"),
        ("STORE response with no statuses", "response", _pack({0: 4, 1: []}), "INVALID_FIELD", "§7 one status per record"),
        ("contact peer id of 37 bytes", "response", _pack({0: 6, 1: [{0: PB[:37], 1: []}]}), "INVALID_FIELD", "§3.1 peer_id 38 bytes"),
        ("contact peer id not Ed25519", "response", _pack({0: 6, 1: [{0: b"\x12\x20" + bytes(36), 1: []}]}),
         "INVALID_FIELD", "§3.1 Ed25519 peer id"),
        ("contact /p2p/ names another peer", "response", _pack({0: 6, 1: [{0: PB, 1: [ADDR_A]}]}),
         "INVALID_FIELD", "§3.1 /p2p/ equals peer_id"),
        ("contact addrs missing", "response", _pack({0: 6, 1: [{0: PB}]}), "INVALID_FIELD", "§3.1 addrs required"),
        ("33 contacts", "response", _pack({0: 6, 1: [contact] * 33}), "LIMIT_EXCEEDED", "§2 MAX_CONTACTS"),
        ("FIND_NODE response contacts missing", "response", _pack({0: 6}), "INVALID_FIELD", "§7 contacts required"),
        ("FIND_VALUE result is an array", "response", _pack({0: 8, 1: [[[], []]]}), "INVALID_FIELD", "§7 result map"),
        ("FIND_VALUE result without contacts", "response", _pack({0: 8, 1: [{0: []}]}), "INVALID_FIELD", "§7 result map"),
        ("FIND_VALUE with 65 records for a key", "response", _pack({0: 8, 1: [{0: [g] * 65, 1: []}]}),
         "LIMIT_EXCEEDED", "§2 MAX_SUBKEYS_PER_KEY"),
        ("FIND_VALUE with no results", "response", _pack({0: 8, 1: []}), "INVALID_FIELD", "§7 one result per key"),
        ("ERROR code is a string", "response", _pack({0: 9, 1: "BUSY", 2: ""}), "INVALID_FIELD", "§7 code uint"),
        ("ERROR message of 1025 bytes", "response", _pack({0: 9, 1: 22, 2: "x" * 1025}), "INVALID_FIELD", "§7 message <= 1024 bytes"),
    ]:
        bad(name, dec, data, err, rule)
    return out


# spec/dht.md §6.1: the fields of config.json that a plain checkpoint's swarm name hashes.
FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_parameters", "attention_bias",
    "mlp_bias", "hidden_act", "tie_word_embeddings", "sliding_window",
)
_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 16, "hidden_act": "silu",
    "hidden_size": 64, "intermediate_size": 128, "max_position_embeddings": 2048, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False, "vocab_size": 256,
}
_MISTRAL = {
    **_LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 4096,
    "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
}


def _swarm_name(path: str, config: dict) -> tuple[str, str]:
    """The rule of spec/dht.md §6.1, from its text: (canonical JSON hashed, swarm name)."""
    parts = path.split("/")
    hub = re.fullmatch(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)", parts[-3]) if len(parts) >= 3 and parts[-2] == "snapshots" else None
    base = f"{hub['org']}/{hub['name']}" if hub else parts[-1]
    name = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-")
    fields = {key: config.get(key) for key in FINGERPRINT_FIELDS}
    fields["architecture"] = config["architectures"][0]
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return canonical, f"{name}.{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def _model_names() -> list[dict]:
    out = []
    for what, path, config in [
        ("a checkpoint directory", "My Model", _LLAMA),
        ("a hub cache snapshot", "models--Some-Org--Bio_Model-8B/snapshots/0123abcd", _MISTRAL),
    ]:
        canonical, swarm_name = _swarm_name(path, config)
        out.append({"name": what, "path": path, "config": config, "fingerprint_json": canonical, "swarm_name": swarm_name})
    return out


def generate() -> dict:
    return {
        "spec": "spec/dht.md",
        "revision": 1,
        "description": "DHT records and RPC messages (msgpack, small integer keys). Each entry's 'decoder' "
        "names what reads its hex (see generate_dht.py); 'now_ms' is the receiver's clock for validation. "
        "Keys: Ed25519 seeds 0x01*32 (peer A) and 0x02*32 (peer B).",
        "valid": _valid(),
        "invalid": _invalid(),
        "model_names": _model_names(),
    }


def main() -> None:
    text = json.dumps(generate(), indent=1) + "\n"
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
