"""biopetals-conformance: run the spec's conformance checks against a live peer.

    biopetals-conformance --swarm-key lab.key --peer /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW... [--section all] [--json]

Exit status: 0 when no check failed, 1 when one did, 2 for a usage error (bad
arguments, unreadable key file). See README.md, "Testing another implementation".
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import asyncio
import sys

from biopetals.conformance.context import Context
from biopetals.conformance.catalog import checks_for
from biopetals.conformance.report import exit_status, row, table, to_json
from biopetals.conformance.runner import run_checks


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biopetals-conformance",
        description="Check a live BioPetals peer (this implementation or another) against spec/: "
        "one check per testable MUST/SHOULD, each naming its spec section. Prints a table "
        "(pass / FAIL / n/a, with what was sent and received on failure); exit status 1 if any check fails.",
        epilog="example: biopetals-conformance --swarm-key lab.key --peer /ip4/127.0.0.1/tcp/31337/p2p/12D3KooW... "
        "--section node. Exit status: 0 no check failed, 1 a check failed, 2 usage error. "
        "The vectors come from this checkout's spec/vectors (or $BIOPETALS_SPEC_VECTORS).",
    )
    key = p.add_mutually_exclusive_group()
    key.add_argument("--swarm-key", metavar="FILE", help="the swarm key file of the peer's private swarm")
    key.add_argument("--public", action="store_true", help="the peer runs a public swarm (no swarm key)")
    p.add_argument("--peer", metavar="MULTIADDR", help="the peer to test: /ip4/HOST/tcp/PORT/p2p/PEER_ID")
    p.add_argument("--section", choices=["transport", "node", "dht", "weights", "all"], default="all",
                   help="which checks to run (default all; node checks are n/a on a DHT-only peer, weights checks "
                        "on a peer that serves no manifest)")
    p.add_argument("--model", metavar="SWARM_NAME",
                   help="the swarm name the weights checks ask for (default: the model of the peer's NodeInfo)")
    p.add_argument("--only", metavar="TEXT", action="append", default=[],
                   help="run only checks whose id contains TEXT (repeatable)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--list", action="store_true", help="list the checks (id, level, spec section, title) and exit")
    p.add_argument("--max-idle-wait", type=float, default=30.0, metavar="S",
                   help="longest session idle_timeout to wait for in node.lifetime.idle-timeout (default 30 s; longer: n/a)")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="X",
                   help="multiply every check's deadline (slow peers, loaded machines)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each result as it comes (to stderr) and tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    checks = [c for c in checks_for(args.section) if not args.only or any(t in c.id for t in args.only)]
    if args.list:
        try:
            for c in checks:
                print(f"{c.id:<52} {c.level:<6} {c.spec:<36} {c.title}")
        except BrokenPipeError:  # `--list | head`
            sys.stdout = None
        return 0
    if not args.peer or not (args.swarm_key or args.public):
        print("biopetals-conformance: --peer and one of --swarm-key/--public are required", file=sys.stderr)
        return 2
    try:
        from biopetals.protocol.multiaddr import Multiaddr
        from biopetals.transport.keyfiles import load_swarm_key

        Multiaddr.parse(args.peer)
        swarm_key = None if args.public else load_swarm_key(args.swarm_key)
    except Exception as exc:
        print(f"biopetals-conformance: {exc}", file=sys.stderr)
        return 2
    ctx = Context(args.peer, swarm_key, verbose=args.verbose, max_idle_wait=args.max_idle_wait, model=args.model)

    def progress(r):
        if args.verbose:
            print(row(r), file=sys.stderr, flush=True)

    results = asyncio.run(run_checks(checks, ctx, on_result=progress, timeout_scale=args.timeout_scale))
    print(to_json(results, args.peer) if args.json else table(results))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
