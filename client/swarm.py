"""The client's view of the swarm: its network host, the DHT, announcements, peer health and routes.

``RemoteSwarm`` owns the client's event loop thread (``LoopThread``), a transport
``Host`` that dials only (it never listens: a client is not a server), and a DHT
in client mode bootstrapped from ``initial_peers``. It

* reads the per-block announcements of a model (spec/announcement.md) with one
  batched DHT traversal (``get_many``) and turns them into ``ServerSpan`` offers;
* keeps the measured RTT of every connected peer (transport keepalive), and pings
  candidate nodes it has no RTT for before routing (``probe_rtts``);
* avoids failing peers with exponential back-off (``routing.PeerHealth``);
* finds routes with ``routing.find_route`` (sans-IO) and makes stateless
  ``Forward``/``Backward`` calls with deadlines (spec/messages.md §6).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field, replace

from biopetals.dht.node import DHT
from biopetals.protocol.announcement import State
from biopetals.protocol.envelope import PROTOCOL_NAME
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity
from biopetals.protocol.limits import MAX_TENSOR_ELEMENTS
from biopetals.protocol.messages import (
    Backward,
    BackwardResult,
    Error,
    Forward,
    ForwardResult,
    Message,
    NodeInfo,
    NodeInfoRequest,
    decode_message,
    encode_message,
)
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host
from biopetals.transport.joining import JoinError, require_join
from biopetals.transport.keyfiles import load_swarm_key
from biopetals.transport.swarm_options import EXAMPLE_PEER, check_peer

from .announcements import read_announcements
from .chunking import Chunking
from .errors import PeerFailure, describe_code, peer_failure_from
from .loop import LoopThread
from .measurements import MeasureParams, SpeedBook
from .routing import (
    DeadlineParams,
    PeerHealth,
    RouteSpan,
    RoutingParams,
    ServerSpan,
    expected_step_time,
    find_route,
    step_deadline,
)
from .span_session import dial_target
from .verification import DEFAULT_VERIFY, Verifier, VerifyParams

__all__ = ["ClientConfig", "RemoteSwarm"]

log = logging.getLogger("biopetals.client")


@dataclass(frozen=True)
class ClientConfig:
    """How the client talks to the swarm. Every remote call has a deadline."""

    initial_peers: tuple[str, ...] = ()
    swarm_key: str | bytes | SwarmKey | None = None  # path of the key file, raw 32 bytes, or a SwarmKey
    codec: str = "f16"  # activations on the wire; "f32" is lossless for fp32 models
    connect_timeout: float = 10.0  # s, dial + open a session
    # No initial peer accepts us (wrong swarm key, unreachable): raise ``JoinError`` at once
    # (True), or only log it and keep retrying the DHT bootstrap (False: a long-running server
    # such as biopetals-api that may start before the swarm, and answers 503 meanwhile).
    require_join: bool = True
    # Deadline for each span's result of one inference step (adaptive, ``routing.step_deadline``):
    #   clamp(step_timeout_factor x expected, step_timeout_floor, step_timeout x ceil(work / 512)),
    #   where expected is the step's tokens over the node's announced throughput (its share of the
    #   span) + 2 x RTT, and work is the step's batch x tokens (a long prefill gets a longer ceiling).
    step_timeout: float = 60.0  # s, ceiling per 512 tokens of a step: no step waits longer, whatever the estimate
    step_timeout_floor: float = 5.0  # s, no step deadline is shorter
    step_timeout_factor: float = 8.0  # slack over the expected time
    stall_ban: float = 30.0  # s, a peer that missed a deadline is avoided at least this long
    forward_timeout: float = 120.0  # s, one Forward/Backward call
    use_push: bool = True  # server-to-server push (spec/messages.md §5.7); False: the client relays each hop
    max_failovers: int = 8  # replacements within one step/call before giving up
    announcement_ttl: float = 5.0  # s, reuse fetched announcements this long
    # Before routing, connect to and ping candidate nodes whose RTT we have not measured yet
    # (at most ``rtt_probes`` at once, all within ``rtt_probe_timeout``; 0 turns it off).
    rtt_probes: int = 32
    rtt_probe_timeout: float = 1.0  # s
    # Before routing a session over blocks that several nodes serve, ask those nodes how many
    # sessions they have open (NodeInfo, within ``rtt_probe_timeout``), so that concurrent
    # clients spread over replicas by throughput and load (``RoutingParams.load_weight``).
    load_probes: bool = True
    ban_base: float = 2.0  # s, first back-off of a failing peer (doubles per failure)
    ban_cap: float = 300.0
    routing: RoutingParams = field(default_factory=RoutingParams)
    # Measured step times (client/measurements.py): a node costs the slower of its announcement and its
    # measurement, and a session moves off a span measured ``move_factor`` x slower than another route.
    measuring: MeasureParams = field(default_factory=MeasureParams)
    seed: int | None = None  # routing tie-break randomness (None: from the OS)
    # A server-side adapter (spec/messages.md §6.3) for every session and forward/backward:
    # routes use only nodes that announce it (an older node would ignore the field).
    adapter: str | None = None
    # Limits of the messages this client sends (client/chunking.py; spec/tensors.md §2): a long prefill
    # goes in several steps, a large Forward/Backward batch in several calls. A sender MAY use a smaller
    # element limit than the spec's; ``max_call_tokens`` is batch x tokens a node takes in one call.
    max_message_elements: int = MAX_TENSOR_ELEMENTS
    max_call_tokens: int = 8192
    # Verified computation (client/verification.py; spec/tensors.md §10): the fraction of steps whose
    # output each span's node gives that are recomputed on a replica (1.0: every step, paranoid; 0: off).
    # A node found lying is avoided for the client's life and the evidence goes to the log and, if set,
    # to ``verify_evidence_dir`` (evidence.jsonl + tensors). ``verify_tolerance``: override the relative
    # error derived from the codec and the nodes' dtypes.
    verify: float = DEFAULT_VERIFY
    verify_tolerance: float | None = None
    verify_evidence_dir: str | None = None

    def verify_params(self) -> VerifyParams:
        return VerifyParams(rate=self.verify, tolerance=self.verify_tolerance, evidence_dir=self.verify_evidence_dir)

    def chunking(self) -> Chunking:
        """The rule that splits requests into messages, at this config's codec and limits."""
        return Chunking(codec=str(self.codec), max_elements=self.max_message_elements,
                        max_call_tokens=self.max_call_tokens)


def _swarm_key(value: str | bytes | SwarmKey | None) -> SwarmKey | bytes | None:
    if value is None or isinstance(value, (SwarmKey, bytes)):
        return value
    return load_swarm_key(value)


def check_initial_peers(addrs: tuple[str, ...]) -> None:
    """ValueError naming the problem unless ``addrs`` is a non-empty list of multiaddrs (before any dial)."""
    if not addrs:
        raise ValueError(f"no initial peers: give the multiaddr of at least one swarm member, e.g. {EXAMPLE_PEER}")
    for addr in addrs:
        check_peer(addr)


class RemoteSwarm:
    """Network access for one client model; every public method is a coroutine run on ``self.loop``."""

    def __init__(self, model_name: str, n_blocks: int, config: ClientConfig, hidden_size: int | None = None,
                 max_positions: int | None = None) -> None:
        self.model_name = model_name
        self.n_blocks = n_blocks
        # the model's width and positions (its context): requests beyond them are refused before sending
        self.hidden_size = hidden_size
        self.max_positions = max_positions
        self.config = config
        self.health = PeerHealth(base=config.ban_base, cap=config.ban_cap)
        self.speeds = SpeedBook(config.measuring)  # measured decode step times, per peer, for every session
        self.rng = random.Random(config.seed)
        self.verifier = Verifier(config.verify_params())  # raises ValueError on a bad rate, before connecting
        self.verify_rng = random.Random(None if config.seed is None else config.seed + 1)
        self.loop = LoopThread()
        self.host: Host | None = None
        self.dht: DHT | None = None
        self._servers: list[ServerSpan] = []
        self._fetched_at = -1e18
        check_initial_peers(config.initial_peers)
        self._key = _swarm_key(config.swarm_key)
        try:
            self.loop.run(self._start(), timeout=config.connect_timeout + 30)
        except BaseException:
            self.loop.close()
            raise

    async def _start(self) -> None:
        host = Host(Identity.generate(), swarm_key=self._key,
                    config=TransportConfig(call_timeout=self.config.forward_timeout, keepalive_interval=5.0))
        await host.__aenter__()
        self.host = host
        try:
            try:
                await require_join(host, self.config.initial_peers, timeout=self.config.connect_timeout,
                                   alone_hint=None)
            except JoinError as exc:
                if self.config.require_join:
                    raise
                log.warning("%s (retrying in the background)", exc.message)
            dht = DHT(host, initial_peers=self.config.initial_peers, client_mode=True)
            await dht.__aenter__()
        except BaseException:
            await host.__aexit__(None, None, None)
            raise
        self.dht = dht

    def close(self) -> None:
        if self.loop.running:
            try:
                self.loop.run(self._stop(), timeout=15)
            except Exception as exc:  # closing must not raise
                log.debug("closing the client swarm: %s", exc)
            self.loop.close()

    async def _stop(self) -> None:
        if self.dht is not None:
            await self.dht.__aexit__(None, None, None)
        if self.host is not None:
            await self.host.__aexit__(None, None, None)

    # ------------------------------------------------------------------ announcements

    async def fetch_servers(self, force: bool = False) -> list[ServerSpan]:
        """Every node announcing blocks of the model (one batched DHT traversal per 16 keys)."""
        now = time.monotonic()
        if not force and now - self._fetched_at < self.config.announcement_ttl and self._servers:
            return self._servers
        assert self.dht is not None
        offers = {
            peer: ServerSpan(
                peer_id=peer, start=ann.start, end=ann.end, addrs=tuple(ann.addrs),
                inference_tps=ann.inference_tps, forward_tps=ann.forward_tps,
                cache_tokens_left=ann.cache_tokens_left, online=ann.state == State.ONLINE,
                adapters=tuple(ann.adapters), dtype=ann.dtype, quant=ann.quant,
            )
            for peer, ann in (await read_announcements(self.dht, self.model_name, self.n_blocks)).items()
        }
        self._servers = sorted(offers.values(), key=lambda s: (s.start, s.end, s.peer_id))
        self._fetched_at = now
        return self._servers

    @property
    def servers(self) -> list[ServerSpan]:
        """The announcements fetched last (``fetch_servers``), without a DHT lookup."""
        return self._servers

    def rtts(self) -> dict[str, float]:
        """Measured round trips of the peers we hold connections to."""
        out = {}
        assert self.host is not None
        for conn in self.host.connections():
            rtt = conn.statistics().min_rtt
            if rtt is not None:
                out[str(conn.peer_id)] = rtt
        return out

    async def probe_rtts(self, servers: list[ServerSpan]) -> int:
        """Connect to and ping the online, not-avoided ``servers`` we have no RTT for, at once,
        within ``rtt_probe_timeout``: the route then weighs measured round trips, not a default.
        Connections stay pooled (their keepalive keeps measuring). Returns how many answered."""
        cfg = self.config
        assert self.host is not None
        known, now = self.rtts(), time.monotonic()
        todo = [s for s in servers if s.online and s.peer_id not in known and not self.health.is_banned(s.peer_id, now)]
        todo = todo[: cfg.rtt_probes] if cfg.rtt_probe_timeout > 0 else []
        if not todo:
            return 0

        async def probe(server: ServerSpan) -> None:
            conn = await self.host.connect(dial_target(server), timeout=cfg.rtt_probe_timeout)
            await conn.ping(timeout=cfg.rtt_probe_timeout)

        tasks = [asyncio.ensure_future(probe(s)) for s in todo]
        done, pending = await asyncio.wait(tasks, timeout=cfg.rtt_probe_timeout)
        for task in pending:
            task.cancel()
        answered = 0
        for task in done:
            if task.exception() is None:
                answered += 1
            else:
                log.debug("RTT probe failed: %s", task.exception())
        return answered

    async def probe_loads(self, servers: list[ServerSpan]) -> dict[str, int]:
        """Open sessions of each online, not-avoided server that shares a block with another
        (``NodeInfo.sessions_open``), asked at once within ``rtt_probe_timeout``; servers that do not
        answer in time are left out (counted as idle)."""
        cfg = self.config
        now = time.monotonic()
        todo = [s for s in servers if s.online and not self.health.is_banned(s.peer_id, now)]
        todo = [s for s in todo if any(o is not s and o.start < s.end and s.start < o.end for o in todo)]
        if not cfg.load_probes or not todo:
            return {}

        async def sessions(server: ServerSpan) -> int | None:
            reply = await self.call(server, NodeInfoRequest(), NodeInfo, cfg.rtt_probe_timeout)
            return reply.sessions_open

        tasks = {s.peer_id: asyncio.ensure_future(sessions(s)) for s in todo[: cfg.rtt_probes]}
        await asyncio.wait(tasks.values(), timeout=cfg.rtt_probe_timeout)
        out = {}
        for peer, task in tasks.items():
            if not task.done():
                task.cancel()
            elif task.exception() is None and task.result() is not None:
                out[peer] = int(task.result())
            else:
                log.debug("load probe of %s failed: %s", peer, task.exception())
        return out

    async def find_route(self, start: int, end: int, *, needed_cache_tokens: int = 0, force: bool = False,
                         forward: bool = False) -> list[RouteSpan]:
        servers = await self.fetch_servers(force=force)
        if self.config.adapter is not None:  # never send an adapter to a node that does not list it (§6.3)
            servers = [s for s in servers if self.config.adapter in s.adapters]
        servers = [s for s in servers if not self.verifier.is_liar(s.peer_id)]  # proven liars, for good
        candidates = [s for s in servers if s.start < end and s.end > start]
        await self.probe_rtts(candidates)
        if not forward:
            loads = await self.probe_loads(candidates)
            servers = [replace(s, sessions=loads.get(s.peer_id, 0)) for s in servers]
        if forward:  # stateless calls: rank by batched-forward throughput, ignore cache room
            servers = [dataclasses.replace(s, inference_tps=s.forward_tps or s.inference_tps) for s in servers]
            needed_cache_tokens = 0
        now = time.monotonic()
        measured = {} if forward else self.speeds.believed_block_times(now)  # decode steps say nothing of Forward
        return find_route(servers, start, end, now=now, rng=self.rng, rtts=self.rtts(),
                          health=self.health, needed_cache_tokens=needed_cache_tokens,
                          params=self.config.routing, model=self.model_name, measured=measured)

    def step_deadline(self, server: ServerSpan, start: int, end: int, batch: int, tokens: int) -> float:
        """Seconds to wait for ``server``'s result of one step over ``[start, end)`` (``ClientConfig``)."""
        cfg = self.config
        expected = expected_step_time(server, start, end, batch, tokens, self.rtts().get(server.peer_id),
                                      cfg.routing)
        params = DeadlineParams(floor=min(cfg.step_timeout_floor, cfg.step_timeout), factor=cfg.step_timeout_factor,
                                ceiling=cfg.step_timeout)
        return step_deadline(expected, params, work=batch * tokens)

    def failed(self, failure: PeerFailure) -> None:
        # A missed deadline (a stalled node) is avoided at least ``stall_ban``; other failures
        # back off from ``ban_base``, doubling while they repeat.
        stalled = failure.code == int(ErrorCode.TIMEOUT)
        until = self.health.record_failure(failure.peer_id, time.monotonic(),
                                           at_least=self.config.stall_ban if stalled else 0.0)
        log.warning("avoiding %s for %.0f s: %s", failure.peer_id, until - time.monotonic(), failure.reason)
        # a node that failed may have stopped: the next route re-reads the DHT
        self._fetched_at = -1e18

    # ------------------------------------------------------------------ stateless calls

    async def call(self, server: ServerSpan, request: Message, expected: type[Message], timeout: float,
                   codec: str | None = None) -> Message:
        """One request/response call (spec/messages.md §2.1); any failure is a ``PeerFailure``."""
        assert self.host is not None
        try:
            data = await self.host.call(dial_target(server), PROTOCOL_NAME, encode_message(request, codec), timeout=timeout)
            reply = decode_message(data, expected=(expected, Error))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise peer_failure_from(server.peer_id, exc) from exc
        if isinstance(reply, Error):
            raise PeerFailure(server.peer_id, f"{describe_code(reply.code)}: {reply.message}", int(reply.code))
        return reply

    async def forward(self, route: RouteSpan, hidden, codec: str, mask=None, prompts=None):
        request = Forward(model=self.model_name, start=route.start, end=route.end, hidden=hidden, codec=codec,
                          mask=mask, prompts=prompts, adapter=self.config.adapter)
        reply = await self.call(route.server, request, ForwardResult, self.config.forward_timeout, codec)
        return reply.hidden  # its shape is checked by the chain state (client/chain.py), with every other answer

    async def backward(self, route: RouteSpan, hidden, grad_outputs, codec: str, mask=None, prompts=None):
        """``(grad_inputs, grad_prompts)``; ``grad_prompts`` is None without ``prompts``."""
        request = Backward(model=self.model_name, start=route.start, end=route.end, hidden=hidden,
                           grad_outputs=grad_outputs, codec=codec, mask=mask, prompts=prompts,
                           adapter=self.config.adapter)
        reply = await self.call(route.server, request, BackwardResult, self.config.forward_timeout, codec)
        return reply.grad_inputs, reply.grad_prompts  # shapes checked by the chain state (client/chain.py)
