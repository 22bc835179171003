"""``biopetals-dht``: run a DHT-only node, the bootstrap peer of a swarm (spec/dht.md §8.4).

Prints the multiaddr that other nodes pass as ``--initial-peers`` on the first line
of standard output, then serves until SIGINT or SIGTERM. ``--interactive`` also
reads commands from standard input and answers each with one JSON line (used by
the integration tests, handy for poking at a swarm by hand).
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from typing import Any

from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.transport.addresses import announce_addrs
from biopetals.transport.host import Host
from biopetals.transport.errors import expected_failures
from biopetals.transport.keyfiles import KeyFileError, load_or_create_identity, load_swarm_key

from . import params
from .ids import is_peer_id_subkey
from .node import DHT, DHTConfig

log = logging.getLogger("biopetals.dht.cli")

_DESCRIPTION = """\
Run a BioPetals DHT node: a bootstrap peer that stores and serves signed block
announcements for a swarm, and serves no model blocks itself.

  biopetals-dht --swarm-key lab.key                       first node of a swarm
  biopetals-dht --swarm-key lab.key --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW...

The first line printed is this node's multiaddr: give it to other nodes and clients
as --initial-peers. Stop with Ctrl-C (SIGINT) or SIGTERM.
"""

_INTERACTIVE_HELP = """\
commands for --interactive (one per line on stdin, one JSON line answered on stdout):
  store KEY VALUE TTL     sign VALUE (UTF-8 text) under KEY with our peer id as subkey,
                          expiring TTL seconds from now; answers accepted/rejected counts
  get KEY [KEY ...]       look up keys in one traversal; answers {key: {subkey: {value, expiration}}}
  stats                   routing table and storage counters
  quit                    shut down (as SIGTERM)
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biopetals-dht",
        description=_DESCRIPTION,
        epilog=_INTERACTIVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--swarm-key", metavar="FILE",
                     help="the swarm's key file (IPFS swarm.key format, from `biopetals-keygen swarm`); "
                          "only peers holding the same key can connect")
    key.add_argument("--public", action="store_true", help="run a public swarm without a swarm key")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=31337, help="TCP port to listen on, 0 for any free port (default 31337)")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MULTIADDR",
                   help="multiaddrs (with /p2p/<peer id>) of nodes already in the swarm")
    p.add_argument("--identity", metavar="FILE",
                   help="node identity key file, created if missing (keeps the peer id across restarts); "
                        "default: a new identity every run")
    p.add_argument("--announce", nargs="*", metavar="MULTIADDR",
                   help="addresses to advertise to other nodes (default: the listen address; with 0.0.0.0, "
                        "this machine's primary IP address)")
    p.add_argument("--request-timeout", type=float, default=params.REQUEST_TIMEOUT,
                   help=f"seconds before a DHT request fails (default {params.REQUEST_TIMEOUT:g})")
    p.add_argument("--republish-interval", type=float, default=params.REPUBLISH_INTERVAL,
                   help=f"seconds between republishing our own records (default {params.REPUBLISH_INTERVAL:g})")
    p.add_argument("--refresh-interval", type=float, default=params.REFRESH_INTERVAL,
                   help=f"seconds after which an untouched bucket is refreshed (default {params.REFRESH_INTERVAL:g})")
    p.add_argument("--interactive", action="store_true", help="read commands from stdin (see below)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return p


def _subkey_text(subkey: bytes) -> str:
    return str(PeerId(subkey)) if is_peer_id_subkey(subkey) else subkey.hex()


async def _command(dht: DHT, line: str, stop: asyncio.Event) -> dict[str, Any]:
    parts = line.split()
    if not parts:
        return {"error": "empty command"}
    cmd, args = parts[0], parts[1:]
    if cmd == "store" and len(args) == 3:
        key, value, ttl = args[0], args[1], float(args[2])
        result = await dht.store(key, dht.peer_id, value.encode(), time.time() + ttl)
        return {"ok": True, "accepted": result.accepted, "rejected": result.rejected}
    if cmd == "get" and args:
        found = await dht.get_many(args)
        return {"ok": True, "values": {
            k: {_subkey_text(s): {"value": v.decode("utf-8", "replace"), "expiration": e} for s, (v, e) in subs.items()}
            for k, subs in found.items()}}
    if cmd == "stats":
        stats = dht.statistics()
        stats["contact_ids"] = sorted(str(PeerId(c.peer_id)) for c in dht.table.contacts())
        return {"ok": True, **stats}
    if cmd == "quit":
        stop.set()
        return {"ok": True}
    return {"error": f"unknown command {line!r}"}


async def _interactive(dht: DHT, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            stop.set()
            return
        try:
            answer = await _command(dht, line.decode().strip(), stop)
        except (ProtocolError, ValueError) as e:
            answer = {"error": str(e)}
        print(json.dumps(answer), flush=True)


async def run(args: argparse.Namespace) -> int:
    swarm_key = None if args.public else load_swarm_key(args.swarm_key)
    identity = load_or_create_identity(args.identity) if args.identity else Identity.generate()
    for addr in args.initial_peers:
        parsed = Multiaddr.parse(addr)
        if parsed.peer_id is None:
            raise SystemExit(f"biopetals-dht: --initial-peers {addr}: needs /p2p/<peer id> at the end")
    config = DHTConfig(request_timeout=args.request_timeout, republish_interval=args.republish_interval,
                       refresh_interval=args.refresh_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Host(identity, swarm_key=swarm_key) as host:
        listen = await host.listen(args.host, args.port)
        addrs = announce_addrs(args.announce or [], listen, identity.peer_id)
        announce = [str(a.without_peer_id()) for a in addrs]
        print(str(addrs[0]), flush=True)
        async with DHT(host, initial_peers=args.initial_peers, config=config, announce_addrs=announce) as dht:
            log.info("DHT node %s up; %d contacts after bootstrap", identity.peer_id, len(dht.table))
            if args.initial_peers and not len(dht.table):
                log.error("could not join through any initial peer (wrong swarm key or address?); retrying")
            tasks = [asyncio.create_task(stop.wait())]
            if args.interactive:
                tasks.append(asyncio.create_task(_interactive(dht, stop)))
            await stop.wait()
            for t in tasks:
                t.cancel()
    log.info("DHT node %s stopped", identity.peer_id)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return asyncio.run(run(args))
    except BaseException as exc:  # errors raised inside the Host's TaskGroup arrive wrapped in a group
        failures = expected_failures(exc, (KeyFileError, ProtocolError, OSError))
        if failures is None:
            raise
        for e in failures:
            print(f"biopetals-dht: {e}", file=sys.stderr)
        return 1



if __name__ == "__main__":
    sys.exit(main())
