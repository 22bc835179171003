"""``biopetals-api``: serve a private swarm's model through an OpenAI-compatible API and a web page.

    biopetals-api --model ./Llama3-OpenBioLLM-8B --swarm-key lab.key \\
        --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW... [--host 127.0.0.1] [--port 8000]

then point an OpenAI client at ``http://127.0.0.1:8000/v1`` or open ``http://127.0.0.1:8000/``.
It prints ``READY http://HOST:PORT`` when it serves (``--port 0``: a free port). Listening
beyond loopback needs ``--api-keys FILE`` (see ``auth``). Exit status 2 on a bad argument,
an unreadable key file or a model directory it cannot load.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import logging
import socket
import sys
from typing import Any

from biopetals.transport.swarm_options import add_swarm_options, check_swarm_options, swarm_key_of

__all__ = ["build_parser", "engine_options", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biopetals-api",
        description="An OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) and a web "
                    "page (chat and swarm view) in front of a BioPetals swarm.")
    p.add_argument("--model", required=True,
                   help="the checkpoint directory (config, tokenizer, embeddings and head are loaded here; the "
                        "blocks run on the swarm), or a hub name org/name: only those files are downloaded")
    add_swarm_options(p, join="join")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs --api-keys)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--api-keys", metavar="FILE",
                   help="file of API keys, one per line, each one word of at least 16 characters, mode 0600: "
                        "requests must send 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the checkpoint directory's name)")
    p.add_argument("--model-name", default=None,
                   help="the model's name in the swarm, if the nodes were started from a copy named otherwise")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="generations served at once (one inference session each); more get 429 (default 8)")
    p.add_argument("--max-tokens-default", type=int, default=256,
                   help="new tokens when a request does not say max_tokens (default 256)")
    p.add_argument("--codec", choices=["f16", "f32", "bf16"], default="f16",
                   help="activation codec on the wire (default f16; f32 is lossless)")
    p.add_argument("--step-timeout", type=float, default=60.0, help="longest wait for one step of a node (s)")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="K",
                   help="speculative decoding by prompt lookup: up to K candidate tokens drafted from the prompt go "
                        "through the swarm with each step of greedy requests (temperature 0), whose output it never "
                        "changes; pays on slow links, costs compute on busy nodes (README 'Speculative decoding'); "
                        "a request's 'prompt_lookup' field overrides it (0..32; default 0: off)")
    p.add_argument("--verify", type=_rate, default=0.0, metavar="P",
                   help="verified computation: the fraction of steps (per span) recomputed on an independent replica "
                        "and compared; a node proven to lie is avoided and its work redone (0.05: one step in 20; "
                        "1: every step, about half the speed; README 'Verified computation'; default 0: off)")
    p.add_argument("--verify-evidence-dir", metavar="DIR", default=None,
                   help="with --verify, write the evidence of every disagreement here (evidence.jsonl and the "
                        "tensors as safetensors); default: the log only")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return p


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text!r}")
    return value


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """``Engine``'s keyword arguments (the client's ``from_pretrained`` options among them) from the options."""
    return dict(max_sessions=args.max_sessions, served_name=args.served_model_name,
                max_tokens_default=args.max_tokens_default, codec=args.codec, model_name=args.model_name,
                step_timeout=args.step_timeout, prompt_lookup=args.prompt_lookup, verify=args.verify,
                verify_evidence_dir=args.verify_evidence_dir)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_swarm_options(parser, args)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.max_sessions < 1:
        print("biopetals-api: --max-sessions must be at least 1", file=sys.stderr)
        return 2
    if not 0 <= args.prompt_lookup <= 32:
        print("biopetals-api: --prompt-lookup must be in 0..32", file=sys.stderr)
        return 2
    from biopetals.transport.keyfiles import KeyFileError

    from .auth import check_bind, load_api_keys

    try:
        keys = load_api_keys(args.api_keys) if args.api_keys else None
        check_bind(args.host, keys)
        swarm_key = swarm_key_of(args)
    except (KeyFileError, ValueError) as exc:
        print(f"biopetals-api: {exc}", file=sys.stderr)
        return 2
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"biopetals-api: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2

    from biopetals.models.config import ModelConfigError

    from .engine import Engine

    try:
        engine = Engine(args.model, initial_peers=args.initial_peers, swarm_key=swarm_key, **engine_options(args))
    except (ModelConfigError, OSError) as exc:
        print(f"biopetals-api: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve(engine, keys, sock, args)
    finally:
        engine.close()


def _serve(engine, keys, sock: socket.socket, args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    app = create_app(engine, keys)
    config = uvicorn.Config(app, log_level="warning" if args.verbose == 0 else "info", access_log=args.verbose > 0,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    async def run() -> None:
        import asyncio

        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            print(f"READY http://{shown}:{port}", flush=True)
            print(f"  OpenAI API: http://{shown}:{port}/v1   web page: http://{shown}:{port}/", flush=True)
        await task

    import asyncio

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
