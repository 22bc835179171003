"""The handshake state machine (protocol/handshake.py, spec/transport.md §2) between two real parties.

Every failure rule of the spec has a test here or in tests/test_vectors_handshake.py; these
tests use fresh random keys, so they also check that nothing depends on the vectors' fixed ones.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.handshake import (
    HANDSHAKE_TIMEOUT,
    MAX_HANDSHAKE_MESSAGE_LEN,
    NOISE_PROTOCOL_PRIVATE,
    NOISE_PROTOCOL_PUBLIC,
    PROTOCOL_ID,
    Handshake,
    HandshakeResult,
    Rejection,
    RejectReason,
    Role,
    State,
)
from biopetals.protocol.identity import Identity

ALICE = Identity.generate()
BOB = Identity.generate()


def pair(key_i: bytes | None, key_r: bytes | None, **kw) -> tuple[Handshake, Handshake]:
    return Handshake(Role.INITIATOR, ALICE, key_i, **kw), Handshake(Role.RESPONDER, BOB, key_r)


def complete(init: Handshake, resp: Handshake) -> tuple[HandshakeResult, HandshakeResult]:
    assert resp.receive_data(init.data_to_send()) is None
    ri = init.receive_data(resp.data_to_send())
    rr = resp.receive_data(init.data_to_send())
    assert ri is not None and rr is not None
    return ri, rr


@pytest.mark.parametrize("keyed", [True, False])
def test_handshake_authenticates_both_sides(keyed: bool) -> None:
    key = os.urandom(32) if keyed else None
    init, resp = pair(key, key, expected_peer_id=BOB.peer_id)
    assert init.state is State.AWAIT_MSG2 and resp.state is State.AWAIT_MSG1
    ri, rr = complete(init, resp)
    assert init.is_done and resp.is_done
    assert ri.remote_peer_id == BOB.peer_id and rr.remote_peer_id == ALICE.peer_id
    assert ri.remote_public_key == BOB.public_key and rr.remote_public_key == ALICE.public_key
    assert ri.handshake_hash == rr.handshake_hash
    assert ri.protocol_name == (NOISE_PROTOCOL_PRIVATE if keyed else NOISE_PROTOCOL_PUBLIC)
    # Both directions of the secure channel work and are distinct keys.
    rr.channel.receive_data(ri.channel.encrypt(b"ping"))
    assert rr.channel.next_plaintext() == b"ping"
    ri.channel.receive_data(rr.channel.encrypt(b"pong"))
    assert ri.channel.next_plaintext() == b"pong"
    assert init.data_to_send() == b"" and resp.data_to_send() == b""


def test_each_handshake_is_unique() -> None:
    key = os.urandom(32)
    h1 = complete(*pair(key, key))[0].handshake_hash
    h2 = complete(*pair(key, key))[0].handshake_hash
    assert h1 != h2


def test_message_sizes_match_the_spec() -> None:
    key = os.urandom(32)
    init, resp = pair(key, key)
    m1 = init.data_to_send()
    resp.receive_data(m1)
    m2 = resp.data_to_send()
    init.receive_data(m2)
    m3 = init.data_to_send()
    assert (len(m1), len(m2), len(m3)) == (2 + 48, 2 + 203, 2 + 171)
    assert int.from_bytes(m1[:2], "big") == 48
    init_pub, _ = pair(None, None)
    assert len(init_pub.data_to_send()) == 2 + 32


def test_wrong_swarm_key_fails_on_both_sides_within_one_round_trip() -> None:
    init, resp = pair(os.urandom(32), os.urandom(32))
    with pytest.raises(RemoteProtocolError) as r_err:
        resp.receive_data(init.data_to_send())
    assert r_err.value.code == ErrorCode.SWARM_KEY_MISMATCH
    reply = resp.data_to_send()
    # The outsider gets exactly the fixed Rejection: no identity, no peer id, no static key.
    assert reply == Rejection(RejectReason.SWARM_KEY_REQUIRED, PROTOCOL_ID).encode()
    assert BOB.public_key not in reply and str(BOB.peer_id).encode() not in reply
    assert resp.state is State.FAILED and resp.error is r_err.value
    with pytest.raises(RemoteProtocolError) as i_err:
        init.receive_data(reply)
    assert i_err.value.code == ErrorCode.SWARM_KEY_MISMATCH
    assert "swarm key does not match" in i_err.value.message
    assert init.data_to_send() == b""  # message 3 (our identity) is never sent


@pytest.mark.parametrize(
    ("key_i", "key_r", "reason", "words"),
    [
        (None, b"k" * 32, RejectReason.SWARM_KEY_REQUIRED, "we have no swarm key"),
        (b"k" * 32, None, RejectReason.SWARM_KEY_UNEXPECTED, "public swarm"),
    ],
)
def test_keyed_and_unkeyed_peers_fail_clearly(key_i, key_r, reason, words) -> None:
    init, resp = pair(key_i, key_r)
    with pytest.raises(RemoteProtocolError) as r_err:
        resp.receive_data(init.data_to_send())
    assert r_err.value.code == ErrorCode.SWARM_KEY_MISMATCH
    reply = resp.data_to_send()
    assert reply == Rejection(reason, PROTOCOL_ID).encode()
    with pytest.raises(RemoteProtocolError) as i_err:
        init.receive_data(reply)
    assert i_err.value.code == ErrorCode.SWARM_KEY_MISMATCH
    assert words in i_err.value.message


def test_peer_id_mismatch_names_both_ids_and_withholds_message3() -> None:
    carol = Identity.generate()
    key = os.urandom(32)
    init, resp = pair(key, key, expected_peer_id=carol.peer_id)
    resp.receive_data(init.data_to_send())
    with pytest.raises(RemoteProtocolError) as err:
        init.receive_data(resp.data_to_send())
    assert err.value.code == ErrorCode.PEER_ID_MISMATCH
    assert str(carol.peer_id) in err.value.message and str(BOB.peer_id) in err.value.message
    assert init.data_to_send() == b""


def test_responder_can_require_a_peer_id() -> None:
    key = os.urandom(32)
    init = Handshake(Role.INITIATOR, ALICE, key)
    resp = Handshake(Role.RESPONDER, BOB, key, Identity.generate().peer_id)
    resp.receive_data(init.data_to_send())
    init.receive_data(resp.data_to_send())
    with pytest.raises(RemoteProtocolError) as err:
        resp.receive_data(init.data_to_send())
    assert err.value.code == ErrorCode.PEER_ID_MISMATCH


def test_transport_bytes_right_behind_message3_reach_the_channel() -> None:
    key = os.urandom(32)
    init, resp = pair(key, key)
    resp.receive_data(init.data_to_send())
    ri = init.receive_data(resp.data_to_send())
    assert ri is not None
    rr = resp.receive_data(init.data_to_send() + ri.channel.encrypt(b"early data"))
    assert rr is not None and rr.channel.next_plaintext() == b"early data"


def test_byte_by_byte_delivery() -> None:
    key = os.urandom(32)
    init, resp = pair(key, key)

    def trickle(sender: Handshake, receiver: Handshake) -> None:
        data = sender.data_to_send()
        for i in range(len(data)):
            receiver.receive_data(data[i : i + 1])

    trickle(init, resp)  # message 1
    trickle(resp, init)  # message 2
    trickle(init, resp)  # message 3
    assert init.is_done and resp.is_done
    assert init.result.handshake_hash == resp.result.handshake_hash


def test_oversize_length_fails_before_the_body_arrives() -> None:
    _, resp = pair(None, None)
    with pytest.raises(RemoteProtocolError) as err:
        resp.receive_data((MAX_HANDSHAKE_MESSAGE_LEN + 1).to_bytes(2, "big"))
    assert err.value.code == ErrorCode.HANDSHAKE_FAILED
    assert resp.data_to_send() == b""


def test_eof_during_handshake() -> None:
    init, _ = pair(os.urandom(32), None)
    init.data_to_send()
    with pytest.raises(RemoteProtocolError) as err:
        init.receive_data(b"")
    assert err.value.code == ErrorCode.HANDSHAKE_FAILED and "closed" in err.value.message


def test_stall_is_not_an_error_here() -> None:
    """Half a message is just pending: the runtime's HANDSHAKE_TIMEOUT (not a clock here) ends it."""
    key = os.urandom(32)
    init, resp = pair(key, key)
    assert resp.receive_data(init.data_to_send()[:20]) is None
    assert resp.state is State.AWAIT_MSG1
    assert HANDSHAKE_TIMEOUT == 10.0


def test_misuse_is_a_local_error() -> None:
    key = os.urandom(32)
    init, resp = pair(key, key)
    with pytest.raises(LocalProtocolError):
        _ = resp.result
    complete(init, resp)
    with pytest.raises(LocalProtocolError):
        resp.receive_data(b"more")
    bad_i, bad_r = pair(os.urandom(32), os.urandom(32))
    with pytest.raises(RemoteProtocolError):
        bad_r.receive_data(bad_i.data_to_send())
    with pytest.raises(LocalProtocolError):
        bad_r.receive_data(b"again")
    with pytest.raises(LocalProtocolError):
        Handshake(Role.INITIATOR, ALICE, b"short")


def test_garbage_message1_is_not_answered() -> None:
    _, resp = pair(None, os.urandom(32))
    with pytest.raises(RemoteProtocolError) as err:
        resp.receive_data(b"\x00\x05hello")
    assert err.value.code == ErrorCode.HANDSHAKE_FAILED
    assert resp.data_to_send() == b""


def test_protocol_modules_do_no_io() -> None:
    """Sans-IO: the modules of this part import no asyncio, socket, time or threading."""
    root = Path(__file__).resolve().parents[1] / "protocol"
    for name in ("noise.py", "handshake.py", "secure_channel.py"):
        tree = ast.parse((root / name).read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"asyncio", "socket", "time", "threading", "selectors"}, name
