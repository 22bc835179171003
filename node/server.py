"""``run_node``: a whole node - host, DHT, blocks, service and announcements - until stopped.

Order of start-up (spec/announcement.md §2.1 for the states):

1. listen and join the DHT (``--new-swarm``: no initial peers; node/network.py, which
   node/cli.py opens before importing torch and transformers); with a weights manifest
   (spec/weights.md), serve the chunks of the parts on disk and announce them as a
   provider (``--model`` a swarm name: first fetch the manifest from a provider);
2. announce ``JOINING`` for every block; without ``--blocks``, first choose them from the
   swarm's announcements (node/placement.py);
3. load only the served blocks (``models.blocks.BlockSpan.load``, progress bar) and
   measure throughput (or read it from the throughput cache, node/benchmark.py
   ``cached_throughput``), both on the worker thread so the DHT keeps answering; blocks the
   directory lacks are fetched from peers first (weights/fetch.py), also on a move;
4. install the ``/biopetals/node/2`` handler, announce ``ONLINE``, print
   ``READY <multiaddr>``; re-announce every ``announce_interval`` s; without ``--blocks``,
   re-evaluate the swarm's balance and move when it pays (node/relocation.py).

On stop (``stop`` event, set by SIGINT/SIGTERM in node/cli.py) it announces
``OFFLINE`` with a short expiry first, then closes sessions and connections.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple


from biopetals.dht.node import DHT
from biopetals.models.blocks import BlockSpan
from biopetals.models.config import ModelConfigError, load_config, model_info
from biopetals.models.hub import HubCheckpoint, is_hub_name
from biopetals.node.adapters import AdapterSet
from biopetals.node.announcer import AnnouncementInfo, Announcer
from biopetals.node.backend import Backend, set_threads
from biopetals.node.benchmark import measure_throughput, span_throughput
from biopetals.node.budget import CacheBudget
from biopetals.node.handler import NodeService, ServiceConfig
from biopetals.node.network import NodeNetwork, open_network
from biopetals.node.options import NodeOptions, check_blocks
from biopetals.node.placement import place_node
from biopetals.node.quant import quantize_span
from biopetals.node.relocation import Rebalancer, Relocator
from biopetals.node.sizing import default_num_blocks, free_memory
from biopetals.node.startup_trace import mark
from biopetals.protocol.announcement import State
from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.transport.host import Host
from biopetals.weights.fetch import fetch_parts
from biopetals.weights.limits import ServeLimits
from biopetals.weights.local import CorruptCopy, LocalWeights
from biopetals.weights.server import ProviderAnnouncer, WeightsServer
from biopetals.weights.source import ModelSource, resolve_source

__all__ = ["NodeOptions", "run_node", "VERSION"]

VERSION = "biopetals/0.1.0"
log = logging.getLogger("biopetals.node")


def load_span(options: NodeOptions) -> BlockSpan:
    set_threads(options.num_threads)  # this executor thread's OpenMP team (loading, the benchmark)
    span = BlockSpan.load(
        options.model, options.start, options.end, dtype=options.dtype, device=options.device, progress=options.progress
    )
    if options.quant != "none":
        quantize_span(span, options.quant)
    return span


def load_adapters(options: NodeOptions, span: BlockSpan) -> AdapterSet:
    """The ``--adapters`` for ``span``: only the tensors of its blocks (node/adapters.py)."""
    adapters = AdapterSet()
    for name, path in options.adapters:
        adapters.load(name, path, span.layers, span.start, span.dtype, span.device)
    return adapters


def _model_facts(options: NodeOptions, directory: Path):
    """Config, swarm name, block count and the blocks to serve (or how many to choose); checks --blocks."""
    config, _ = load_config(directory)  # fails early on an unsupported architecture
    info = model_info(directory, config)
    n_layers = int(config.num_hidden_layers)
    choose = options.start is None
    num_blocks = None
    if choose:
        num_blocks = options.num_blocks or default_num_blocks(
            config, free=free_memory(options.device), dtype=options.dtype, quant=options.quant,
            max_cache_tokens=options.max_cache_tokens)
        check_blocks(None, None, num_blocks, n_layers)
        options.start, options.end = 0, num_blocks  # until chosen
    else:
        check_blocks(options.start, options.end, None, n_layers)
    return config, info, n_layers, choose, num_blocks


class WeightsService(NamedTuple):
    server: WeightsServer
    provider: ProviderAnnouncer


def _serve_weights(options: NodeOptions, source: ModelSource, host: Host, dht: DHT,
                   addrs: list[str]) -> WeightsService | None:
    """With a manifest: serve the chunks of the parts held here (spec/weights.md §3) and announce them."""
    if source.manifest is None or not options.serve_weights:
        return None
    local = LocalWeights(source.manifest, source.directory)
    server = WeightsServer(host, local, ServeLimits(per_peer=options.weights_per_peer, per_address=options.weights_per_address,
                                                   rate=options.weights_rate * 1e6 if options.weights_rate else None))
    server.install()
    return WeightsService(server, ProviderAnnouncer(dht, local, tuple(addrs), interval=options.announce_interval))


def _fetching_loader(options: NodeOptions, source: ModelSource, host: Host, dht: DHT, weights: WeightsService | None,
                     loop: asyncio.AbstractEventLoop, out: Callable[[str], None],
                     hub: HubCheckpoint | None = None) -> Callable[[NodeOptions], BlockSpan]:
    """``load_span`` that first fetches the blocks the directory lacks, from peers or, for a hub
    name, only the hub's shards that hold them (run on a worker thread)."""

    def load(opts: NodeOptions) -> BlockSpan:
        if hub is not None:
            hub.fetch_blocks(opts.start, opts.end)
        if source.manifest is not None:
            blocks = list(range(opts.start, opts.end))
            missing = source.missing(blocks)
            if missing:
                announcing: set[asyncio.Task] = set()

                def part_done(part: int) -> None:  # runs on the event loop, inside fetch_parts
                    if weights is not None:  # serve the finished part at once, and say so
                        weights.server.local.refresh()
                        task = loop.create_task(weights.provider.announce())
                        announcing.add(task)
                        task.add_done_callback(announcing.discard)

                report = asyncio.run_coroutine_threadsafe(
                    fetch_parts(host, dht, source.manifest, source.directory, missing, progress=opts.progress,
                                on_part_done=part_done),
                    loop).result()
                out(report.line())
            if options.verify_weights:  # what was fetched was verified chunk by chunk; the rest now
                _verify_blocks(source, weights, [b for b in blocks if b not in missing], opts.progress)
        return load_span(opts)

    return load


def _verify_blocks(source: ModelSource, weights: WeightsService | None, blocks: list[int], progress: bool) -> None:
    """Hash the blocks about to be loaded against the manifest: a node never computes with weights
    that differ from the ones its swarm name promises (~0.5 s per GB, disk reads aside)."""
    if not blocks:
        return
    local = weights.server.local if weights is not None else LocalWeights(source.manifest, source.directory)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(source.manifest.parts[b].size for b in blocks)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=f"verifying blocks {blocks[0]}:{blocks[-1] + 1}", mininterval=0.5)
    try:
        local.verify(blocks, bar.update if bar is not None else (lambda n: None))
    except (CorruptCopy, KeyError) as exc:
        raise ModelConfigError(
            f"the weights of blocks {blocks[0]}:{blocks[-1] + 1} in {source.directory} do not match its manifest "
            f"({exc}): fetch them again (move the bad block files away and start the node from the manifest), or "
            f"rebuild the manifest if the checkpoint changed on purpose (biopetals-manifest)") from None
    finally:
        if bar is not None:
            bar.close()


def _probe_loader(source: ModelSource, load: Callable[[NodeOptions], BlockSpan],
                  from_hub: bool = False) -> Callable[[NodeOptions], BlockSpan]:
    """What placement measures one block with: every block has the same shape, so any block already
    on this machine will do, and a node that holds none yet (or downloads from the hub) measures a
    block with random weights rather than fetch one it may never serve."""

    def probe(opts: NodeOptions) -> BlockSpan:
        if source.manifest is not None or from_hub:
            held = [] if from_hub else [
                p for p in LocalWeights(source.manifest, source.directory).held if p < source.manifest.num_blocks]
            if not held:
                set_threads(opts.num_threads)
                span = BlockSpan.random(opts.model, dtype=opts.dtype, device=opts.device)
                if opts.quant != "none":
                    quantize_span(span, opts.quant)
                return span
            opts = replace(opts, start=held[0], end=held[0] + 1)
        return load(opts)

    return probe


async def run_node(
    options: NodeOptions,
    stop: asyncio.Event,
    *,
    out: Callable[[str], None] = lambda line: print(line, flush=True),
    network: NodeNetwork | None = None,
) -> None:
    """Run the node until ``stop`` is set; on ``network`` if it is already open (node/network.py),
    else opened here once the model's facts are checked."""
    hub = None
    if is_hub_name(options.model):  # config and shard index now, the blocks' shards once they are chosen
        hub = HubCheckpoint(options.model, revision=options.revision, progress=options.progress)
        options.model = str(hub.directory)
        out(f"downloading from the hub: {hub.repo_id} (revision {options.revision or 'main'}) into {hub.directory}")
    source = resolve_source(options.model, options.weights_dir)
    facts = None if source.needs_network else _model_facts(options, source.directory)  # fail before listening
    if network is None:
        async with open_network(options) as network:
            await _serve(options, stop, out, network, source, facts, hub)
    else:
        await _serve(options, stop, out, network, source, facts, hub)
    out("stopped")


async def _serve(options: NodeOptions, stop: asyncio.Event, out: Callable[[str], None], network: NodeNetwork,
                 source: ModelSource, facts, hub: HubCheckpoint | None) -> None:
    host, dht, addrs = network.host, network.dht, network.addrs
    if facts is None:  # only a swarm name: the manifest comes from a provider
        await source.complete(host, dht, lambda manifest: [], progress=options.progress)
        facts = _model_facts(options, source.directory)
    config, info, n_layers, choose, num_blocks = facts
    options.model = str(source.directory)
    weights = _serve_weights(options, source, host, dht, addrs)
    # announced from the start: peers may fetch what this node holds while it loads or fetches
    provider_task = asyncio.create_task(weights.provider.run()) if weights is not None else None
    load = _fetching_loader(options, source, host, dht, weights, asyncio.get_running_loop(), out, hub)
    announcer = Announcer(
        dht,
        AnnouncementInfo(info.dht_prefix, options.start, options.end, options.dtype, options.quant, VERSION,
                         tuple(addrs), tuple(name for name, _ in options.adapters),
                         options.public_name or None),
        interval=options.announce_interval,
        ttl=max(3 * options.announce_interval, 30.0),
    )
    if choose:
        (options.start, options.end), _ = await place_node(
            options, dht, announcer, info.dht_prefix, n_layers, num_blocks, _probe_loader(source, load, hub is not None),
            random.Random())
    else:
        await announcer.announce(State.JOINING, (0.0, 0.0), 0)
    mark("joining-announced")
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    span = await loop.run_in_executor(None, load, options)
    loaded = time.perf_counter() - started
    mark("weights-loaded")
    throughput, cached = (0.0, 0.0), False
    if options.benchmark:
        # measure_throughput named here, looked up at call time: tests/broken_node.py replaces it in this module
        throughput, cached = await loop.run_in_executor(None, span_throughput, options, span, measure_throughput)
    mark("throughput-measured")

    def build(span: BlockSpan, throughput: tuple[float, float]) -> NodeService:
        # a span's adapters are small (LoRA tensors of its blocks): loaded here, also on a move
        backend = Backend(
            span, num_threads=options.num_threads, adapters=load_adapters(options, span),
            max_queue_per_peer=options.max_queue_per_peer, slice_tokens=options.compute_slice_tokens,
        )
        budget = CacheBudget(
            span.cache_bytes_per_token(), options.max_cache_tokens,
            min(options.max_session_tokens, options.max_cache_tokens), peer_share=options.max_peer_cache_share,
        )
        return NodeService(
            host,
            backend,
            budget,
            ServiceConfig(
                model=info.dht_prefix,
                version=VERSION,
                dtype=options.dtype,
                quant=options.quant,
                idle_timeout=options.idle_timeout,
                max_keepalive_hold=options.max_keepalive_hold,
            ),
            throughput=throughput,
        )

    service = build(span, throughput)
    service.install()
    await announcer.announce(State.ONLINE, throughput, service.budget.tokens_left)
    mark("online-announced")
    out(f"model {info.dht_prefix} ({config.architectures[0]}), blocks {options.start}:{options.end} of {n_layers}, "
        f"{options.device}, {options.dtype}, quant {options.quant}; loaded in {loaded:.1f} s")
    if options.adapters:
        out(f"adapters: {', '.join(name for name, _ in options.adapters)}")
    how = f"read from {options.throughput_cache}" if cached else "measured" if options.benchmark else "not measured"
    out(f"throughput: inference {throughput[0]:.1f} tokens/s, forward {throughput[1]:.1f} tokens/s ({how})")
    for addr in addrs:
        out(f"listening on {addr}")
    out(f"READY {addrs[0]}")
    relocator = Relocator(options, announcer, service, build, load, drain_timeout=options.idle_timeout if options.drain_timeout is None else options.drain_timeout,
                          out=out)
    tasks = [asyncio.create_task(
        announcer.run(lambda: (relocator.service.throughput, relocator.service.budget.tokens_left))
    )]
    if provider_task is not None:
        tasks.append(provider_task)
    metrics_server = None
    if options.metrics_port is not None:
        from biopetals.node.handler import error_replies
        from biopetals.node.metrics import NodeCollector, serve_metrics

        metrics_server, _ = serve_metrics(options.metrics_port, options.metrics_host, NodeCollector(
            lambda: relocator.service, lambda: dict(error_replies), options.public_name))
        out(f"metrics on http://{options.metrics_host}:{metrics_server.server_port}/metrics")
    if choose and options.balance_quality > 0:  # --blocks: fixed, never moves
        rebalancer = Rebalancer(dht, host, relocator, info.dht_prefix, n_layers,
                                quality=options.balance_quality, interval=options.balance_interval,
                                rng=random.Random())
        tasks.append(asyncio.create_task(rebalancer.run()))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()
        host.remove_handler(PROTOCOL_NAME)
        if weights is not None:
            weights.server.close()
        try:
            async with asyncio.timeout(10):
                await announcer.announce(State.OFFLINE, relocator.service.throughput, 0)
            out("announced offline")
        except (TimeoutError, Exception) as exc:  # still shut down
            log.warning("could not announce offline: %s", exc)
        await relocator.aclose()
