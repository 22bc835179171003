"""``biopetals-swarm``: what a private swarm serves for a model, node by node, and which blocks
have no online node.

    biopetals-swarm --model ./Llama3-OpenBioLLM-8B --swarm-key lab.key \\
        --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW... [--node-info] [--json]

It joins the DHT as a client (it never listens), reads the model's block announcements
(spec/announcement.md) like the client library does before routing, and prints one line per
node (blocks, state, dtype, announced throughput, free cache, address) and the coverage of
the blocks: per run of blocks served alike, how many online nodes serve it and their
announced throughput together (the smallest is the swarm's bottleneck, spec/announcement.md
§5). ``--node-info`` also asks every node for its ``NodeInfo`` (spec/messages.md §4.2:
open sessions, decode steps, uptime), each within ``--timeout``. Exit status: 0 when every
block has an online node, 1 when some block has none (for monitoring scripts), 2 on errors.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from biopetals.dht.node import DHT
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.identity import Identity
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host
from biopetals.transport.errors import expected_failures
from biopetals.transport.keyfiles import KeyFileError, load_swarm_key

from .swarm_status import NodeStatus, SwarmStatus, format_text, read_status, to_json

__all__ = ["NodeStatus", "SwarmStatus", "read_status", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biopetals-swarm",
                                description="Show what a BioPetals swarm serves for a model, node by node, and which "
                                            "blocks have no online node.",
                                epilog="Exit status: 0 every block served, 1 some block without an online node, 2 error.")
    p.add_argument("--model", required=True,
                   help="the checkpoint (a directory with config.json, or a hub name in the local cache): "
                        "its name and config fingerprint are the model's name in the swarm; or its weights "
                        "manifest file (biopetals-manifest), which names the model by itself")
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--swarm-key", metavar="FILE", help="the swarm's key file (IPFS swarm.key format)")
    key.add_argument("--public", action="store_true", help="a public swarm, without a swarm key")
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                   help="multiaddrs (/ip4/.../tcp/.../p2p/12D3KooW...) of swarm members")
    p.add_argument("--node-info", action="store_true", help="also ask every node for its live load (NodeInfo)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each request (default 5)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return p


async def _run(args: argparse.Namespace, model: str, n_blocks: int) -> SwarmStatus:
    swarm_key = None if args.public else load_swarm_key(args.swarm_key)
    config = TransportConfig(keepalive_interval=0, call_timeout=args.timeout)
    async with Host(Identity.generate(), swarm_key=swarm_key, config=config) as host:
        async with DHT(host, initial_peers=args.initial_peers, client_mode=True) as dht:
            if not len(dht.table):
                raise ConnectionError("could not reach any initial peer (wrong address or swarm key?)")
            return await read_status(host, dht, model, n_blocks, node_info=args.node_info, timeout=args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from biopetals.models.config import ModelConfigError, load_config, model_info  # transformers: only when run

    try:
        if Path(args.model).is_file():  # a weights manifest (spec/weights.md) names the model by itself
            from biopetals.protocol.manifest import parse_manifest

            manifest = parse_manifest(Path(args.model).read_bytes())
            model, n_blocks = manifest.swarm_name, manifest.num_blocks
        else:
            config, _ = load_config(args.model)
            model, n_blocks = model_info(args.model, config).dht_prefix, int(config.num_hidden_layers)
        status = asyncio.run(_run(args, model, n_blocks))
    except BaseException as exc:  # errors inside the Host's and the DHT's task groups arrive wrapped in a group
        failures = expected_failures(exc, (KeyFileError, ProtocolError, OSError, ModelConfigError))
        if failures is None:
            raise
        for e in failures:
            print(f"biopetals-swarm: {e}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(status), indent=2) if args.json else format_text(status))
    return 1 if status.missing() else 0


if __name__ == "__main__":
    sys.exit(main())
