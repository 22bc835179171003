"""``NodeOptions``: everything a node is started with (node/cli.py fills it from the command line).

Its own module so that the modules ``run_node`` drives (node/placement.py, node/relocation.py)
can name it without importing node/server.py, which imports them: no import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from biopetals.node.budget import PEER_SHARE
from biopetals.node.fair_queue import MAX_QUEUE_PER_PEER
from biopetals.node.slices import SLICE_TOKENS
from biopetals.protocol.identity import Identity
from biopetals.protocol.swarm_key import SwarmKey

__all__ = ["NodeOptions", "check_blocks"]


@dataclass
class NodeOptions:
    model: str
    start: int | None  # None with end None: choose the blocks (node/placement.py)
    end: int | None
    identity: Identity
    swarm_key: SwarmKey | None
    host: str = "0.0.0.0"
    port: int = 31337
    initial_peers: list[str] = field(default_factory=list)
    dtype: str = "float32"
    quant: str = "none"
    device: str = "cpu"
    num_threads: int = 0  # torch intra-op threads; 0: torch's default
    max_cache_tokens: int = 16384
    max_session_tokens: int = 8192
    idle_timeout: float = 60.0
    max_keepalive_hold: float = 1800.0  # s, keepalives alone hold a session this long after its last step (§5.9.1)
    max_queue_per_peer: int = MAX_QUEUE_PER_PEER  # compute jobs one peer may have waiting; more: BUSY (node/fair_queue.py)
    compute_slice_tokens: int = SLICE_TOKENS  # tokens of one slice of a large Forward/Backward (node/slices.py)
    max_peer_cache_share: float = PEER_SHARE  # of the KV-cache budget one peer may hold (node/budget.py)
    announce_interval: float = 60.0
    announce: list[str] = field(default_factory=list)  # addresses to announce instead of the listen address
    benchmark: bool = True
    throughput_cache: Path | None = None  # the throughput cache file (node/throughput_cache.py); None: always measure
    progress: bool = True
    adapters: list[tuple[str, Path]] = field(default_factory=list)  # server-side LoRA adapters (name, peft dir)
    num_blocks: int | None = None  # when choosing: how many (None: node/sizing.default_num_blocks)
    join_settle: float = 1.0  # s, mean wait before re-checking a chosen span (node/placement.py)
    balance_quality: float = 0.75  # move when bottleneck < quality x reachable (node/relocation.py); 0: never
    balance_interval: float = 60.0  # s, mean period of the re-evaluation
    drain_timeout: float | None = None  # s, old sessions may run this long after a move (None: idle_timeout)
    weights_dir: str | None = None  # where weights fetched from peers go (--model MANIFEST or swarm name)
    serve_weights: bool = True  # serve the chunks of held parts to peers (with a manifest)
    weights_per_peer: int = 4  # chunk requests in flight per peer
    weights_per_address: int = 16  # chunk requests in flight per source address, whatever its peer ids
    weights_rate: float | None = None  # MB/s of chunks per peer; None: unlimited
    verify_weights: bool = True  # with a manifest: hash the served blocks before loading them
    revision: str | None = None  # --model a hub name: the branch, tag or commit to download
    metrics_port: int | None = None  # Prometheus metrics on this port (node/metrics.py); None: none
    metrics_host: str = "127.0.0.1"
    public_name: str = ""  # a name people recognise (announced, shown by biopetals-swarm and the page); "": none


def check_blocks(start: int | None, end: int | None, num_blocks: int | None, n_layers: int) -> None:
    """ValueError unless ``--blocks start:end`` (or ``--num-blocks``) fits a model of ``n_layers`` blocks."""
    if start is None:
        if num_blocks is not None and not 1 <= num_blocks <= n_layers:
            raise ValueError(f"--num-blocks {num_blocks}: the model has {n_layers} blocks")
    elif not 0 <= start < end <= n_layers:
        raise ValueError(f"--blocks {start}:{end} is not inside the model's 0:{n_layers}")
