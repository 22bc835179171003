"""``biopetals-node``: serve a range of transformer blocks of a model to a private swarm.

Example::

    biopetals-node --model ./Llama3-OpenBioLLM-8B --blocks 0:16 --swarm-key lab.key --new-swarm
    biopetals-node --model ./Llama3-OpenBioLLM-8B --num-blocks 16 --swarm-key lab.key \\
        --initial-peers /ip4/10.0.0.5/tcp/31337/p2p/12D3KooW...

With ``--num-blocks N`` (or neither option: as many blocks as fit in memory) the node
chooses its blocks from the swarm's announcements and moves when the swarm is out of
balance (node/placement.py, node/rebalancer.py).

On start it prints (each line with the time, like its log lines) ``DHT <multiaddr>`` (bare)
once other nodes may join the swarm through it, then the device and dtype, what it serves,
its multiaddrs, and a last line ``READY <multiaddr>`` (bare, for scripts and tests).
SIGINT/SIGTERM/SIGHUP announce it offline, then stop it; with ``--exit-with-parent`` so does
the exit of the process that started it. See node/server.py for the start-up order.

Start-up comes in two parts (issue 23 item 5): this module imports only light modules, listens,
joins the swarm and starts the DHT (node/network.py), prints ``DHT <multiaddr>`` - other nodes
may join through this one from then on - and only then imports torch and transformers (on a
worker thread: the DHT keeps answering) and loads its blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import time

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

from biopetals.models.devices import Accelerators, DeviceError, choose_device, choose_dtype, describe
from biopetals.node.budget import PEER_SHARE
from biopetals.node.fair_queue import MAX_QUEUE_PER_PEER
from biopetals.node.network import open_network
from biopetals.node.options import NodeOptions, check_blocks
from biopetals.node.slices import SLICE_TOKENS
from biopetals.node.startup_trace import mark
from biopetals.node.throughput_cache import cache_path_option
from biopetals.weights.limits import ServeLimits
from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.identity import Identity
from biopetals.protocol.limits import MAX_LABEL_BYTES
from biopetals.protocol.multiaddr import Multiaddr, MultiaddrError
from biopetals.transport.errors import expected_failures
from biopetals.transport.keyfiles import KeyFileError, load_or_create_identity
from biopetals.transport.swarm_options import add_swarm_options, check_swarm_options, swarm_key_of

DEFAULT_PORT = 31337
#: models.blocks.DTYPES and node.quant.QUANT_MODES, named here so that --help needs no torch
#: (tests/test_node_startup.py checks they agree).
DTYPE_NAMES = ("bfloat16", "float16", "float32")
QUANT_NAMES = ("none", "int8", "nf4")
#: What the node imports once its network is open (torch, transformers): on a worker thread.
HEAVY_MODULES = ("biopetals.node.server",)
#: Output lines printed without the time: scripts read them (client/local_swarm.py).
BARE_LINES = ("READY ", "DHT ")
log = logging.getLogger("biopetals.node")


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:END, e.g. 0:16") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= START < END")
    return start, end


def _adapter(text: str):
    from biopetals.node.adapters import AdapterError, parse_adapter_arg

    try:
        return parse_adapter_arg(text)
    except AdapterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bounded(convert, what: str, ok, need: str):
    """An argparse type: ``convert(text)``, refused unless ``ok(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: need {need}")
        return value

    return parse


_positive = _bounded(int, "a whole number", lambda v: v >= 1, "at least 1")
_seconds = _bounded(float, "a number of seconds", lambda v: 0 < v < float("inf"), "a finite number > 0")
_rate = _bounded(float, "a number of MB/s", lambda v: 0 < v < float("inf"), "a finite number > 0")
_quality = _bounded(float, "a number, e.g. 0.75", lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_share = _bounded(float, "a fraction, e.g. 0.5", lambda v: 0 < v <= 1, "a number in (0, 1]")


def _public_name(text: str) -> str:
    size = len(text.encode())
    if not 1 <= size <= MAX_LABEL_BYTES or not text.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 to {MAX_LABEL_BYTES} bytes of printable text")
    return text


def _multiaddr(text: str) -> str:
    try:
        Multiaddr.parse(text)
    except MultiaddrError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biopetals-node",
        description="Serve transformer blocks of a Llama-family model to a BioPetals swarm: a fixed range (--blocks) "
                    "or N blocks the node chooses where the swarm needs them (--num-blocks).",
        epilog="The node prints 'READY <multiaddr>' once it serves. SIGINT/SIGTERM/SIGHUP: announce offline, then stop.",
    )
    p.add_argument("--model", required=True,
                   help="a checkpoint directory (config.json + safetensors), a Hugging Face hub name org/name (the "
                        "config and only the safetensors shards holding this node's blocks are downloaded into the "
                        "HF cache; gated models use your HF token: `hf auth login` or HF_TOKEN), "
                        "or - to fetch the weights from the swarm's peers - a weights manifest file "
                        "(biopetals-manifest) or the swarm name <name>.<16 hex digits> it prints; a directory with a "
                        "manifest fetches the blocks it lacks")
    p.add_argument("--revision", metavar="REV",
                   help="with --model a hub name: the branch, tag or commit to download (default: main)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--blocks", type=_blocks, metavar="START:END",
                       help="the blocks to serve, START inclusive, END exclusive (e.g. 0:16); fixed, never rebalanced")
    which.add_argument("--num-blocks", type=_positive, metavar="N",
                       help="serve N blocks and let the node choose which: the contiguous N blocks that most raise the "
                            "swarm's bottleneck throughput (read from the DHT announcements), moving later when the "
                            "swarm is out of balance (--balance-quality). With neither --blocks nor --num-blocks: "
                            "as many blocks as fit in 80%% of the free memory of --device (weights at --dtype/--quant "
                            "plus each block's share of --max-cache-tokens), at least 1")
    add_swarm_options(p, join="join-or-new")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port to listen on (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0, all interfaces)")
    p.add_argument("--announce", nargs="+", default=[], type=_multiaddr, metavar="MULTIADDR",
                   help="addresses to announce to the swarm instead of the listen address, e.g. a public address "
                        "behind NAT: /ip4/203.0.113.7/tcp/31337 or /dns4/node1.lab.example/tcp/31337 "
                        "(default: the listen address; with 0.0.0.0, this machine's primary IPv4 address)")
    p.add_argument("--dtype", choices=["auto", *DTYPE_NAMES], default="auto",
                   help="compute dtype of the blocks (default auto: bfloat16 on a GPU that supports it, else float16 "
                        "on a GPU or MPS; float32 on the CPU)")
    p.add_argument("--quant", choices=QUANT_NAMES, default="none",
                   help="weight quantisation through bitsandbytes (default none)")
    p.add_argument("--max-cache-tokens", type=int, default=16384, metavar="N",
                   help="total KV-cache budget, in tokens over all served blocks, summed over sessions and batch (default 16384)")
    p.add_argument("--max-session-tokens", type=int, default=8192, metavar="N",
                   help="KV-cache budget of one session, batch_size x max_length tokens (default 8192)")
    p.add_argument("--max-peer-cache-share", type=_share, default=PEER_SHARE, metavar="S",
                   help="the most of --max-cache-tokens that the sessions of one peer may hold, 0 < S <= 1; a peer "
                        f"past it is refused with CACHE_BUDGET so that others still find room; a peer may always hold one "
                        f"session of --max-session-tokens (default {PEER_SHARE})")
    p.add_argument("--max-queue-per-peer", type=_positive, default=MAX_QUEUE_PER_PEER, metavar="N",
                   help="compute jobs (steps, Forward/Backward slices) one peer may have waiting on this node; more "
                        f"are answered BUSY (default {MAX_QUEUE_PER_PEER})")
    p.add_argument("--compute-slice-tokens", type=_positive, default=SLICE_TOKENS, metavar="N",
                   help="a Forward/Backward of more tokens is computed in slices of whole rows of at most N tokens, "
                        "each queued fairly, so other peers' steps run in between; a Forward row longer than N runs in "
                        "chunks of N columns over a KV cache of the row, reserved like a session's (BUSY if it does "
                        "not fit); a session step of more tokens (a long prefill) runs in column chunks of at most N "
                        f"tokens appended to the session's cache (default {SLICE_TOKENS})")
    p.add_argument("--adapters", nargs="+", default=[], type=_adapter, metavar="NAME=PATH",
                   help="server-side LoRA adapters to serve: peft directories (adapter_config.json + "
                        "adapter_model.safetensors); only this node's blocks' tensors are loaded, and clients choose "
                        "one by NAME per session or forward/backward (spec/messages.md §6.3)")
    p.add_argument("--public-name", type=_public_name, default=None, metavar="NAME",
                   help="a name for this node that people recognise, e.g. 'lab-a gpu3' (as in Petals): announced "
                        "with its blocks and shown by biopetals-swarm and the API's page; at most 64 bytes")
    p.add_argument("--identity", metavar="FILE",
                   help="Ed25519 identity key file (created if missing) for a stable peer id; default: a new identity each run")
    p.add_argument("--device", default="auto",
                   help="torch device of the blocks: auto, cpu, cuda, cuda:N or mps (default auto: the first CUDA GPU, "
                        "else Apple's MPS, else the CPU)")
    p.add_argument("--num-threads", type=int, default=0, metavar="N",
                   help="torch intra-op CPU threads of the compute (default 0: torch's default, one per core); "
                        "give each node its share of the cores when several run on one machine")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds after which an idle session is closed (default 60)")
    p.add_argument("--max-keepalive-hold", type=_seconds, default=1800.0, metavar="SECONDS",
                   help="longest time a client's KeepAlive messages alone keep a session open after its last step "
                        "(a long step of the chain elsewhere, spec/messages.md §5.9.1); then it closes as idle "
                        "(default 1800)")
    p.add_argument("--announce-interval", type=float, default=60.0,
                   help="seconds between DHT re-announcements (records expire after 3 intervals; default 60)")
    p.add_argument("--balance-quality", type=_quality, default=0.75, metavar="Q",
                   help="without --blocks: move to other blocks when today's bottleneck throughput is below Q times "
                        "the one reachable by rebalancing (default 0.75, as Petals; 0 never moves)")
    p.add_argument("--balance-interval", type=_seconds, default=60.0, metavar="SECONDS",
                   help="without --blocks: mean seconds between re-evaluations of the swarm's balance (default 60)")
    p.add_argument("--drain-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="when moving to other blocks: how long sessions open on the old blocks may still run there; "
                        "those left then are closed and their clients replay them elsewhere (default: --idle-timeout)")
    p.add_argument("--weights-dir", metavar="DIR",
                   help="where weights fetched from peers go (default $BIOPETALS_CACHE/models/<swarm name>, "
                        "BIOPETALS_CACHE defaulting to ~/.cache/biopetals); later starts load from it")
    p.add_argument("--no-serve-weights", action="store_true",
                   help="do not serve this node's weight chunks to peers (by default a node whose checkpoint has a "
                        "manifest serves the parts it holds, spec/weights.md)")
    p.add_argument("--no-verify-weights", action="store_true",
                   help="with a manifest: skip hashing the served blocks' weights before loading them (by default a "
                        "node refuses to start with weights that differ from its manifest; ~0.5 s per GB)")
    p.add_argument("--weights-rate", type=_rate, default=None, metavar="MB_PER_S",
                   help="serve weight chunks to each peer, and to each source address, at most this fast, in MB/s (default: unlimited)")
    p.add_argument("--weights-per-peer", type=_positive, default=4, metavar="N",
                   help="weight chunk requests served at once per peer; more are answered BUSY (default 4)")
    p.add_argument("--weights-per-address", type=_positive, default=ServeLimits.per_address, metavar="N",
                   help="weight chunk requests served at once per source IP address, whatever peer ids it uses; more "
                        f"are answered BUSY (default {ServeLimits.per_address})")
    p.add_argument("--no-benchmark", action="store_true",
                   help="skip the start-up throughput measurement and its cache (announce 0 tokens/s)")
    p.add_argument("--throughput-cache", metavar="PATH|none", default=None,
                   help="file of measured throughputs: a start with the same model architecture, block count, dtype, "
                        "quant, device, torch version and thread count reads its numbers there instead of measuring "
                        "for seconds; 'none': always measure, store nothing (default "
                        "$BIOPETALS_CACHE/throughput.json, BIOPETALS_CACHE defaulting to ~/.cache/biopetals; delete "
                        "the file to measure again)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while loading")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics (decode steps, sessions, KV cache, queue depth, error replies) on "
                        "http://--metrics-host:PORT/metrics (default: none; 0: any free port)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the metrics endpoint (default 127.0.0.1, this machine only)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop (announcing offline) when the process that started this node exits, however it ends "
                        "(for programs that start nodes for their user, e.g. the demos)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    return p


def resolve_device(args: argparse.Namespace, acc: Accelerators | None = None) -> str:
    """Turn ``--device``/``--dtype`` (``auto`` included) into concrete ones on ``args``; the start-up line."""
    acc = Accelerators.detect() if acc is None else acc
    args.device = choose_device(args.device, acc)
    args.dtype = choose_dtype(args.dtype, args.device, acc)
    return describe(args.device, args.dtype, acc)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(_watch_parent(os.getppid(), stop)) if args.exit_with_parent else None
    identity = load_or_create_identity(args.identity) if args.identity else Identity.generate()
    try:  # the network needs no device: args.device/dtype are resolved below, then the options built again
        async with open_network(_options(args, identity)) as network:
            output_line(f"DHT {network.addrs[0]}")  # other nodes may join through this one now
            for module in HEAVY_MODULES:  # torch, transformers: seconds; the DHT answers meanwhile
                await loop.run_in_executor(None, importlib.import_module, module)
            output_line(await loop.run_in_executor(None, resolve_device, args))
            mark("heavy-imports")
            from biopetals.node.server import run_node

            await run_node(_options(args, identity), stop, out=output_line, network=network)
    finally:
        if watch is not None:
            watch.cancel()


def check_blocks_early(args: argparse.Namespace) -> None:
    """``--blocks``/``--num-blocks`` against a local checkpoint's config.json, before listening
    (node/server.py checks everything again once torch and transformers are loaded)."""
    try:
        with open(os.path.join(args.model, "config.json")) as f:
            n_layers = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return  # a hub name, a manifest, a swarm name or no config: checked later
    if isinstance(n_layers, int) and not isinstance(n_layers, bool):
        check_blocks(args.blocks[0] if args.blocks else None, args.blocks[1] if args.blocks else None,
                     args.num_blocks, n_layers)


def _options(args: argparse.Namespace, identity: Identity) -> NodeOptions:
    return NodeOptions(
        model=args.model,
        start=args.blocks[0] if args.blocks else None,
        end=args.blocks[1] if args.blocks else None,
        num_blocks=args.num_blocks,
        balance_quality=args.balance_quality,
        balance_interval=args.balance_interval,
        drain_timeout=args.drain_timeout,
        identity=identity,
        swarm_key=swarm_key_of(args),
        host=args.host,
        port=args.port,
        initial_peers=list(args.initial_peers),
        dtype=args.dtype,
        quant=args.quant,
        device=args.device,
        num_threads=args.num_threads,
        max_cache_tokens=args.max_cache_tokens,
        max_session_tokens=args.max_session_tokens,
        max_peer_cache_share=args.max_peer_cache_share,
        max_queue_per_peer=args.max_queue_per_peer,
        compute_slice_tokens=args.compute_slice_tokens,
        idle_timeout=args.idle_timeout,
        max_keepalive_hold=args.max_keepalive_hold,
        announce_interval=args.announce_interval,
        announce=list(args.announce),
        benchmark=not args.no_benchmark,
        throughput_cache=cache_path_option(args.throughput_cache),
        progress=not args.no_progress,
        adapters=list(args.adapters),
        weights_dir=args.weights_dir,
        serve_weights=not args.no_serve_weights,
        weights_per_peer=args.weights_per_peer,
        weights_per_address=args.weights_per_address,
        weights_rate=args.weights_rate,
        verify_weights=not args.no_verify_weights,
        revision=args.revision,
        public_name=args.public_name or "",
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def output_line(line: str) -> None:
    """A line of the node's output, with the time as its log lines have it; ``READY <multiaddr>``
    and ``DHT <multiaddr>`` stay bare: scripts and tests read them."""
    if not line.startswith(BARE_LINES):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}"
    print(line, flush=True)


async def _watch_parent(parent: int, stop: asyncio.Event, interval: float = 0.5) -> None:
    """Set ``stop`` once ``parent`` is gone: this process is then re-parented (another ppid)."""
    while os.getppid() == parent:
        await asyncio.sleep(interval)
    log.warning("the process that started this node (pid %d) exited: stopping", parent)
    stop.set()


#: Errors of the heavy modules reported in one line: (module, class name).
_HEAVY_ERRORS = (("biopetals.models.config", "ModelConfigError"), ("biopetals.node.quant", "QuantError"),
                 ("biopetals.node.adapters", "AdapterError"), ("biopetals.weights.fetch", "FetchError"))


def _expected() -> tuple[type[BaseException], ...]:
    """The errors reported in one line; those of a heavy module only if it was imported (an error
    of its class cannot exist otherwise), so a failure before the heavy imports stays quick."""
    heavy = [getattr(sys.modules[m], name) for m, name in _HEAVY_ERRORS if m in sys.modules]
    return (KeyFileError, ProtocolError, OSError, ValueError, DeviceError, *heavy)


def main(argv: list[str] | None = None) -> int:
    imported = time.time(), time.process_time()  # interpreter start and imports end here
    parser = build_parser()
    args = parser.parse_args(argv)
    check_swarm_options(parser, args)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    mark("imports", *imported)
    try:
        check_blocks_early(args)
        asyncio.run(_main(args))
    except BaseException as exc:  # errors inside the Host's TaskGroup arrive wrapped in a group
        failures = expected_failures(exc, _expected())
        if failures is None:
            raise
        for e in failures:
            print(f"biopetals-node: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
