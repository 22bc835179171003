"""The swarm options every program shares: ``--swarm-key``/``--public``, ``--initial-peers``, ``--new-swarm``.

One definition, so that ``biopetals-node``, ``biopetals-dht``, ``biopetals-swarm``,
``biopetals-api``, ``biopetals-fetch`` and ``biopetals-conformance`` spell, check and
explain them alike::

    p = argparse.ArgumentParser()
    add_swarm_options(p, join="join-or-new")   # a node: --initial-peers or --new-swarm
    args = p.parse_args()
    check_swarm_options(p, args)
    key = swarm_key_of(args)                   # SwarmKey, or None with --public

``join`` says how a program reaches the swarm: ``"join-or-new"`` (a node or DHT node:
join through ``--initial-peers`` or start alone with ``--new-swarm``), ``"join"`` (a
client: ``--initial-peers`` required) or ``"none"`` (no ``--initial-peers`` at all).
An initial peer must parse as a multiaddr (spec/transport.md §1.7) at parse time, so
``127.0.0.1:31337`` is refused with the form to use instead of failing silently later.
"""

from __future__ import annotations

import argparse

from biopetals.protocol.multiaddr import Multiaddr, MultiaddrError
from biopetals.protocol.swarm_key import SwarmKey

from .keyfiles import load_swarm_key

__all__ = ["add_swarm_options", "check_swarm_options", "swarm_key_of", "initial_peer", "check_peer", "EXAMPLE_PEER", "JOIN_MODES"]

JOIN_MODES = ("join-or-new", "join", "none")
EXAMPLE_PEER = "/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."


def check_peer(text: str) -> str:
    """``text`` if it parses as a multiaddr to dial; else ValueError saying the form to use."""
    try:
        Multiaddr.parse(text)
    except MultiaddrError as e:
        raise ValueError(f"{text!r} is not a multiaddr ({e.message}); write a peer as {EXAMPLE_PEER}, "
                         f"as the peer prints it in its 'READY' or 'listening on' line") from None
    return text


def initial_peer(text: str) -> str:
    """``check_peer`` as an argparse type (its message kept)."""
    try:
        return check_peer(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_swarm_options(parser: argparse.ArgumentParser, *, join: str = "join", key_required: bool = True,
                      public_help: str = "a public swarm, without a swarm key") -> None:
    """Add ``--swarm-key FILE | --public`` (one of them required unless ``key_required`` is false)
    and, after ``join``, ``--initial-peers`` and ``--new-swarm``."""
    if join not in JOIN_MODES:
        raise ValueError(f"join must be one of {JOIN_MODES}, not {join!r}")
    group = parser.add_argument_group("swarm")
    key = group.add_mutually_exclusive_group(required=key_required)
    key.add_argument("--swarm-key", metavar="FILE",
                     help="the swarm key file of the private swarm (IPFS swarm.key format, from "
                          "`biopetals-keygen swarm`); only peers holding the same key can connect")
    key.add_argument("--public", action="store_true", help=public_help)
    if join == "none":
        return
    group.add_argument("--initial-peers", nargs="+", default=[], type=initial_peer, metavar="MULTIADDR",
                       help=f"multiaddrs of swarm members to join through, e.g. {EXAMPLE_PEER} (as a node prints "
                            "them in its 'READY' line)" + ("" if join == "join-or-new" else "; required"))
    if join == "join-or-new":
        group.add_argument("--new-swarm", action="store_true",
                           help="start a new swarm alone, without --initial-peers (this is its first node)")


def check_swarm_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The rules argparse cannot say: exits through ``parser.error`` (status 2) when broken."""
    peers = getattr(args, "initial_peers", None)
    if peers is None:
        return
    new = getattr(args, "new_swarm", None)
    if new is None:
        if not peers:
            parser.error(f"give --initial-peers: the multiaddr of at least one swarm member, e.g. {EXAMPLE_PEER}")
        return
    if new and peers:
        parser.error("--new-swarm and --initial-peers exclude each other")
    if not new and not peers:
        parser.error("give --initial-peers to join a swarm, or --new-swarm to start a new one alone")


def swarm_key_of(args: argparse.Namespace) -> SwarmKey | None:
    """The swarm key of ``--swarm-key`` (raises KeyFileError), None with ``--public`` or neither."""
    return load_swarm_key(args.swarm_key) if getattr(args, "swarm_key", None) else None
