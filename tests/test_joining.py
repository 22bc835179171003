"""Loud failures on joining (issue 24, item 3) and the one definition of the swarm options.

Units: every program declares ``--swarm-key/--public/--initial-peers/--new-swarm`` through
transport/swarm_options.py and refuses a malformed initial peer at parse time; ``diagnose``
turns dial outcomes into one error. Processes: a node whose only initial peer refuses its
swarm key, or does not listen, exits 1 with the reason and never prints READY; the client
library names a wrong swarm key (SWARM_KEY_MISMATCH) and an unreachable peer.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from support_models import make_tiny_checkpoint
from support_swarm import NODE_COMMAND, Swarm

from biopetals.api.cli import build_parser as api_parser
from biopetals.client.status import build_parser as swarm_parser
from biopetals.client.swarm import ClientConfig, RemoteSwarm
from biopetals.conformance.cli import parser as conformance_parser
from biopetals.dht.cli import build_parser as dht_parser
from biopetals.node.cli import build_parser as node_parser
from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.errors import ConnectionClosedError
from biopetals.transport.joining import JoinError, PeerOutcome, diagnose
from biopetals.transport.keyfiles import write_swarm_key
from biopetals.transport.swarm_options import initial_peer
from biopetals.weights.cli import fetch_parser

PEER = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"
PROGRAMS = {
    "biopetals-node": (node_parser, ["--model", "m"]),
    "biopetals-dht": (dht_parser, []),
    "biopetals-swarm": (swarm_parser, ["--model", "m"]),
    "biopetals-api": (api_parser, ["--model", "m"]),
    "biopetals-fetch": (fetch_parser, ["m"]),
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_every_program_shares_one_definition_of_the_swarm_options(program, capsys):
    build, required = PROGRAMS[program]
    parser = build()
    actions = {a.dest: a for a in parser._actions}
    assert actions["initial_peers"].type is initial_peer and actions["initial_peers"].nargs == "+"
    assert {"swarm_key", "public"} <= actions.keys()
    extra = ["--new-swarm"] if "new_swarm" in actions else []
    args = parser.parse_args([*required, "--swarm-key", "k", "--initial-peers", PEER])
    assert args.initial_peers == [PEER] and args.swarm_key == "k" and not args.public
    args = parser.parse_args([*required, "--public", *(extra or ["--initial-peers", PEER])])
    assert args.public and args.swarm_key is None
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*required, "--swarm-key", "k", "--initial-peers", "127.0.0.1:31337"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "'127.0.0.1:31337' is not a multiaddr" in err and "/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW" in err
    with pytest.raises(SystemExit):
        parser.parse_args([*required, "--swarm-key", "k", "--public", "--initial-peers", PEER])


def test_conformance_shares_the_key_options():
    args = conformance_parser().parse_args(["--public", "--peer", PEER])
    assert args.public and args.swarm_key is None


@pytest.mark.parametrize("main, args", [
    ("biopetals.node.cli", ["--model", "m", "--swarm-key", "k"]),
    ("biopetals.dht.cli", ["--swarm-key", "k", "--new-swarm", "--initial-peers", PEER]),
    ("biopetals.client.status", ["--model", "m", "--swarm-key", "k"]),
])
def test_join_options_that_cannot_work_are_refused_before_anything_starts(main, args):
    result = subprocess.run([sys.executable, "-m", main, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--initial-peers" in result.stderr


def test_diagnose_names_each_peer_and_the_common_cause():
    mismatch = RemoteProtocolError(ErrorCode.SWARM_KEY_MISMATCH, "the peer does not hold our swarm key")
    refused = ConnectionClosedError("connect to 127.0.0.1:9: Connection refused")
    assert diagnose([PeerOutcome("a", mismatch), PeerOutcome("b")], alone_hint=None) is None
    assert diagnose([], alone_hint=None) is None
    error = diagnose([PeerOutcome("a", mismatch), PeerOutcome("b", mismatch)], alone_hint="use --new-swarm")
    assert isinstance(error, JoinError) and error.code == ErrorCode.SWARM_KEY_MISMATCH
    assert error.message.startswith("wrong swarm key") and error.message.count("\n  ") == 2 and "  b refuses our swarm key" in error.message
    assert error.message.endswith("use --new-swarm")
    error = diagnose([PeerOutcome("a", mismatch), PeerOutcome("b", refused)], alone_hint=None)
    assert error.code == ErrorCode.CONNECTION_CLOSED and "cannot join" in error.message
    assert "a refuses our swarm key" in error.message and "b is unreachable (CONNECTION_CLOSED" in error.message
    error = diagnose([PeerOutcome("c", OSError("Network is unreachable"))], alone_hint=None)
    assert "c is unreachable" in error.message and "Network is unreachable" in error.message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("m") / "m", with_tokenizer=False, num_layers=2)


def test_node_with_the_wrong_key_or_no_listener_exits_with_the_reason(tmp_path, tiny):
    other = tmp_path / "other.key"
    write_swarm_key(other, SwarmKey.generate())
    dead = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    with Swarm(tmp_path) as swarm:
        dht = swarm.start_dht()
        result = subprocess.run(
            NODE_COMMAND + ["--model", str(tiny), "--blocks", "0:1", "--swarm-key", str(other), "--host", "127.0.0.1",
                            "--port", "0", "--no-progress", "--initial-peers", dht.addr, dead],
            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "READY" not in result.stdout
    err = result.stderr
    assert "cannot join the swarm" in err and f"{dht.addr} refuses our swarm key (SWARM_KEY_MISMATCH" in err
    assert f"{dead} is unreachable" in err and "--new-swarm" in err


def test_client_names_a_wrong_swarm_key_and_an_unreachable_peer(tmp_path):
    with Swarm(tmp_path) as swarm:
        dht = swarm.start_dht()
        with pytest.raises(JoinError, match="wrong swarm key") as exc:
            RemoteSwarm("m", 2, ClientConfig(initial_peers=(dht.addr,), swarm_key=SwarmKey.generate(),
                                             connect_timeout=5))
        assert exc.value.code == ErrorCode.SWARM_KEY_MISMATCH
    with pytest.raises(JoinError, match="is unreachable"):
        RemoteSwarm("m", 2, ClientConfig(initial_peers=(f"/ip4/127.0.0.1/tcp/{_free_port()}",),
                                         swarm_key=SwarmKey.generate(), connect_timeout=5))
    with pytest.raises(ValueError, match="not a multiaddr"):
        RemoteSwarm("m", 2, ClientConfig(initial_peers=("127.0.0.1:31337",)))
    with pytest.raises(ValueError, match="no initial peers"):
        RemoteSwarm("m", 2, ClientConfig())
