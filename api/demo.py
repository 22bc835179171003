"""Try the API and the web page on this machine: a local 3-node swarm of the bundled SmolLM2, then biopetals-api.

    python -m biopetals.api.demo [--port 8000] [--nodes 3]

Starts ``biopetals-node`` processes on 127.0.0.1 splitting SmolLM2-135M-Instruct (as the
client demo does), then serves the OpenAI-compatible API and the page on
``http://127.0.0.1:PORT/`` until Ctrl-C, which stops the nodes too.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m biopetals.api.demo",
                                description="A local swarm of the bundled SmolLM2 behind biopetals-api and its page.")
    p.add_argument("--port", type=int, default=8000, help="TCP port on 127.0.0.1 (default 8000)")
    p.add_argument("--nodes", type=int, default=3, help="node processes splitting the blocks (default 3)")
    p.add_argument("--max-sessions", type=int, default=8, help="generations served at once (default 8)")
    args = p.parse_args(argv)
    if not 1 <= args.nodes <= 30:
        print("--nodes must be 1 to 30", file=sys.stderr)
        return 2

    from biopetals.client.local_swarm import LocalSwarm
    from biopetals.models.smollm2 import smollm2_path

    from .cli import main as api_main

    print("Preparing the bundled SmolLM2-135M-Instruct (converted once, then cached) ...", flush=True)
    path = smollm2_path()
    try:
        bounds = [round(i * 30 / args.nodes) for i in range(args.nodes + 1)]  # SmolLM2 has 30 blocks
        with LocalSwarm(path, list(zip(bounds, bounds[1:]))) as swarm:
            print(f"{args.nodes} nodes ready on 127.0.0.1; starting the API ...", flush=True)
            return api_main(["--model", str(path), "--swarm-key", str(swarm.key_path), "--initial-peers",
                             *swarm.initial_peers, "--port", str(args.port), "--max-sessions",
                             str(args.max_sessions)])
    except KeyboardInterrupt:
        print("\nStopped: nodes stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
