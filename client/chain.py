"""The client's chain state: the one place that decides a route's spans, position, history and failover.

Sans-IO (as protocol/ and the DHT lookup): no asyncio, no sockets, no clock. Time is
an argument of every call (``now``); the state says what to do next as an action
(``state.action``) and the caller reports what happened. ``get_timer()`` is the
deadline of the action under way, ``handle_timer(now)`` says it passed (aioquic's
habit). The asyncio drivers are client/session.py (inference) and
client/remote_forward.py (``Forward``/``Backward``); client/span_session.py is one
session stream.

What it owns:

- **the route's spans** (``ChainSpan``): which node serves which blocks, for the
  session's life (``SessionChain.spans``) or one call (``CallChain``);
- **the single position** of an inference session (spec/messages.md §5.6): a step
  is validated once here (batch, ``max_length``, prompts) and its ``step_id`` is
  ``position + 1`` on every span, so ids strictly increase and a retry is a
  duplicate to the node (§5.7);
- **which answers were asked for**: every span knows the step ids it was sent or
  had pushed on its behalf; a result for any other step is that node's protocol
  violation, and a result of the wrong shape is its failure, never an abort;
- **rollback** (§5.6.1): ``crop`` cuts the position and every span's history (``cut_history``),
  and the next step, under a fresh step id above every id sent, carries ``truncate``;
- **the history used for replay**: what each span was fed (``Fed``), and the replay
  plan that rebuilds a failed span's KV cache on its replacement, split over
  several nodes if need be, in the original chunks and positions, without push,
  under the original step ids (fresh to the new sessions, still increasing; §5.9),
  then re-sends the current step with push to the rest (§5.7). Sessions that are
  no longer used are abandoned (their stream reset) or, when still healthy,
  closed with ``CloseSession`` (§5.8);
- **the failover budget** (``FailoverBudget``): one rule for sessions, forward and
  backward alike. A node failure avoids the node (``Avoid``: a missed deadline
  counts as a stall) and re-routes its blocks; after ``max_failovers`` failures the
  request ends with a ``SwarmError`` that names once the blocks without a live
  node and each peer tried. A failure the request caused (``PeerFailure.by_request``)
  is raised at once as ``RequestError`` and no node is avoided;
- **chunking** (client/chunking.py, spec/tensors.md §2): a step longer than one message may
  carry (a long prefill) is sent as consecutive steps under the limits, each an ordinary
  step with its own position and step id, so history and replay keep the same chunks; a
  ``Forward``/``Backward`` of more sequences than one message may carry is sent in
  groups of whole sequences, and a single sequence over the limits is refused before
  anything is sent (``RequestError``);
- **chain binding** (§5.10): each session's upstream is the node before it (``OpenSpans.upstreams``),
  none without push; after a replacement the session after it is rebound (``Rebind``) before
  the step is resent, so the replacement's pushes count;
- **deadlines**: a step's result is due ``deadline(server, start, end, batch, tokens)``
  seconds after it was sent (a pure estimate passed in); a pushed result that is
  late is first asked for directly (the node may have missed only the push), a
  step sent directly that is late replaces the node (§5.7, §5.9);
- for ``Forward``/``Backward`` (§6.1, §6.2), stateless calls along the route: a
  failed forward re-routes from its first block, a failed backward re-routes its
  span and first runs forward through the new sub-spans to get their inputs;
- **measured step times**: after each step ``SessionChain.timings`` holds every span's own time
  (from when its input was available, the send or the previous span's result, to its result),
  which the driver feeds to client/measurements.py; ``SessionChain.move`` replaces a span the
  measurements call too slow, make-before-break: the new sessions are opened and replayed first,
  and if that fails the slow span is kept (a slow node beats none).

The rules are written as generators that yield actions and receive outcomes: the
sequential algorithm reads top-down, the I/O is the driver's.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.limits import MAX_BATCH, MAX_SEQUENCE_LENGTH

from .chunking import Chunking, pieces
from .errors import PeerFailure, RequestError, RollbackUnsupportedError, SwarmError
from .measurements import SpanTiming
from .routing import MissingBlocksError, RouteSpan, ServerSpan

__all__ = [
    "Abandon", "Avoid", "CallBackward", "CallChain", "CallForward", "ChainSpan", "FailoverBudget", "Fed",
    "Finished", "OpenSpans", "Rebind", "Route", "SendStep", "SessionChain", "WaitResult", "cut_history",
]

# (server, start, end, batch, tokens) -> seconds to wait for that span's result of that step
DeadlineRule = Callable[[ServerSpan, int, int, int, int], float]

MEASURED_STEPS = 16  # step times kept per span (ChainSpan.step_seconds)


# ---------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Fed:
    """A step a span's node processed: what rebuilds its KV cache on a replacement (§5.9)."""

    step_id: int
    position: int
    hidden: torch.Tensor
    mask: torch.Tensor | None = None  # padding mask of the step's tokens (§8.1)
    prompts: torch.Tensor | None = None  # deep prompts of this span's blocks only (§5.3)


def cut_history(history: list[Fed], position: int) -> list[Fed]:
    """What ``history`` fed below column ``position``: the replay plan after a rollback (§5.6.1, §5.9).

    Steps at or after ``position`` go; a step across it keeps its first columns (its hidden states,
    mask and deep prompts), which is exact because every block is causal. Step ids stay."""
    kept = []
    for fed in history:
        if fed.position >= position:
            break
        keep = position - fed.position
        if keep < int(fed.hidden.shape[1]):
            mask = None if fed.mask is None or bool(fed.mask[:, :keep].all()) else fed.mask[:, :keep]
            prompts = fed.prompts[:, :, :keep] if fed.prompts is not None else None
            fed = Fed(fed.step_id, fed.position, fed.hidden[:, :keep].contiguous(),
                      None if mask is None else mask.contiguous(), None if prompts is None else prompts.contiguous())
        kept.append(fed)
    return kept


@dataclass(eq=False)
class ChainSpan:
    """One inference session of the chain: blocks ``[start, end)`` on ``server``.

    ``handle`` is the driver's object for the session (opaque here)."""

    server: ServerSpan
    start: int
    end: int
    handle: Any = None
    history: list[Fed] = field(default_factory=list)
    expected: dict[int, float] = field(default_factory=dict)  # step id -> when it was sent (asked for)
    arrived: dict[int, torch.Tensor] = field(default_factory=dict)  # results not yet used
    step_seconds: list[float] = field(default_factory=list)  # measured send -> result, the last few
    rollback: bool = False  # its SessionOpened said it accepts ``truncate`` (§5.6.1)
    timed: dict[int, tuple[float, float]] = field(default_factory=dict)  # step id -> (sent, result arrived)
    decode_steps: int = 0  # one-token steps measured since the session opened (client/measurements.py)
    failure: PeerFailure | None = None
    abandoned: bool = False

    @property
    def peer_id(self) -> str:
        return self.server.peer_id

    def __repr__(self) -> str:
        return f"<ChainSpan {self.peer_id[:12]} [{self.start}, {self.end}) fed={len(self.history)}>"


# ---------------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class OpenSpans:
    """Find a route over ``[start, end)`` (``force``: re-read the announcements) and open a session
    on each of its spans, each bound to the upstream ``upstreams(route)`` names (§5.10); report
    ``opened(spans, failures, now)`` or ``no_route(exc, now)``."""

    start: int
    end: int
    force: bool
    upstream: str | None = None  # the node before ``start`` in the chain (None: the chain starts here)
    push: bool = True  # False: the client sends every step itself, no session names an upstream

    def upstreams(self, peers: list[str]) -> list[str | None]:
        """The upstream of each session of a route through ``peers`` (spec/messages.md §5.10): the node
        just before it in the chain, which is the one that pushes into it."""
        if not self.push:
            return [None] * len(peers)
        return [self.upstream, *peers[:-1]]


@dataclass(frozen=True)
class Rebind:
    """Tell ``span``'s node that ``upstream`` pushes into its session from now on (``SetUpstream``,
    §5.10; the node before it was replaced); report ``done(now)``, after ``span_failed`` if it failed."""

    span: ChainSpan
    upstream: str | None


@dataclass(frozen=True)
class SendStep:
    """Send a ``Step`` on ``span`` with ``hops`` as its push chain (§5.3, §5.7), by ``deadline``;
    report ``done(now)``, ``span_failed(span, failure, now)`` or ``handle_timer(now)``."""

    span: ChainSpan
    step_id: int
    position: int
    hidden: torch.Tensor
    hops: tuple[ChainSpan, ...]
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    deadline: float
    truncate: bool = False  # cut the caches to ``position`` first (a rollback, §5.6.1)


@dataclass(frozen=True)
class WaitResult:
    """Wait for events until ``deadline``: report each with ``result(...)``/``span_failed(...)``,
    or ``handle_timer(now)`` when the deadline passes."""

    span: ChainSpan
    step_id: int
    deadline: float


@dataclass(frozen=True)
class Abandon:
    """Drop these sessions (``close``: politely, with ``CloseSession``); report ``done(now)``."""

    spans: tuple[ChainSpan, ...]
    close: bool = False


@dataclass(frozen=True)
class Avoid:
    """Avoid ``failure.peer_id`` for a while (``stalled``: it missed a deadline); report ``done(now)``."""

    failure: PeerFailure

    @property
    def stalled(self) -> bool:
        return self.failure.code == int(ErrorCode.TIMEOUT)


@dataclass(frozen=True)
class Route:
    """Find a route for stateless calls over ``[start, end)``; report ``routed(route, now)`` or ``no_route``."""

    start: int
    end: int
    force: bool


@dataclass(frozen=True)
class CallForward:
    """One ``Forward`` call (§6.1) by ``deadline``; report ``returned(hidden, now)``, ``failed`` or the timer."""

    span: RouteSpan
    hidden: torch.Tensor
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    deadline: float


@dataclass(frozen=True)
class CallBackward:
    """One ``Backward`` call (§6.2); report ``returned((grad_inputs, grad_prompts), now)``, ``failed`` or the timer."""

    span: RouteSpan
    hidden: torch.Tensor
    grad: torch.Tensor
    mask: torch.Tensor | None
    prompts: torch.Tensor | None
    deadline: float


@dataclass(frozen=True)
class Finished:
    """The operation is over; ``value`` is its result."""

    value: Any


Action = (OpenSpans | SendStep | WaitResult | Abandon | Avoid | Rebind | Route | CallForward | CallBackward
          | Finished)
_Rules = Generator[Action, Any, Any]


class _DeadlinePassed(Exception):
    """Thrown into the rules when the current action's deadline passed."""


# ---------------------------------------------------------------------------------------- failover


class FailoverBudget:
    """The node failures one request (a step, a forward or backward pass, an open) may absorb."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.failures: list[PeerFailure] = []
        self.blocks: list[tuple[int, int]] = []

    def charge(self, failure: PeerFailure, start: int, end: int) -> None:
        """Count ``failure`` of the node serving ``[start, end)``; raises ``SwarmError`` once spent."""
        self.failures.append(failure)
        self.blocks.append((start, end))
        if len(self.failures) > self.limit:
            raise self.exhausted()

    def exhausted(self, missing: MissingBlocksError | None = None) -> SwarmError:
        """The error naming once the blocks left without a live node and every peer tried."""
        ranges = missing.missing if missing is not None else _merge_ranges(self.blocks)
        what = ", ".join(f"{a}:{b}" for a, b in ranges)
        text = f"{self.what} failed {len(self.failures)} times: no live node for blocks {what}."
        if missing is not None:
            text += f" {missing}"
        return SwarmError(text, self.failures)


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(set(ranges)):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


class _Machine:
    """Runs one operation's rules (a generator of actions) and takes the driver's reports."""

    def __init__(self, max_failovers: int) -> None:
        self.max_failovers = max_failovers
        self.now = 0.0
        self.action: Action | None = None
        self._rules: _Rules | None = None

    @property
    def busy(self) -> bool:
        return self._rules is not None

    def _start(self, rules: _Rules, now: float) -> None:
        if self._rules is not None:
            raise RuntimeError(f"an operation is under way ({self.action})")
        self._rules = rules
        self._resume(now, rules.send, None)

    def _resume(self, now: float, how: Callable[[Any], Action], value: Any) -> None:
        self.now = now
        try:
            self.action = how(value)
        except StopIteration as stop:
            self._rules, self.action = None, Finished(stop.value)
        except BaseException:
            self._rules, self.action = None, None
            raise

    def _expect(self, *kinds: type) -> _Rules:
        if self._rules is None or not isinstance(self.action, kinds):
            raise RuntimeError(f"no {' or '.join(k.__name__ for k in kinds)} under way (now: {self.action})")
        return self._rules

    # ------------------------------------------------------------------ reports

    def done(self, now: float) -> None:
        """The current ``SendStep``, ``Abandon``, ``Avoid`` or ``Rebind`` is done."""
        self._resume(now, self._expect(SendStep, Abandon, Avoid, Rebind).send, None)

    def no_route(self, exc: MissingBlocksError, now: float) -> None:
        self._resume(now, self._expect(OpenSpans, Route).throw, exc)

    def get_timer(self) -> float | None:
        """When the action under way is due (None: nothing is due)."""
        return getattr(self.action, "deadline", None) if self._rules is not None else None

    def handle_timer(self, now: float) -> None:
        """Time passed: if the action under way is overdue, the rules decide what next."""
        timer = self.get_timer()
        if timer is not None and now >= timer:
            self._resume(now, self._rules.throw, _DeadlinePassed())  # type: ignore[union-attr]

    # ------------------------------------------------------------------ the one failover rule

    def _fail(self, failure: PeerFailure, budget: FailoverBudget, start: int, end: int) -> _Rules:
        """A node failed ``[start, end)``: raise at once if the request caused it, else avoid the node
        and charge the budget (``SwarmError`` once spent); the caller then re-routes."""
        if failure.by_request:
            raise RequestError(failure) from failure
        yield Avoid(failure)
        budget.charge(failure, start, end)

    def _route(self, action: OpenSpans | Route, budget: FailoverBudget) -> _Rules:
        """Ask the driver for a route; no route at all after failures ends the request."""
        try:
            return (yield action)
        except MissingBlocksError as exc:
            if budget.failures:
                raise budget.exhausted(exc) from exc
            raise


def _blocks(prompts: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """Prompts of blocks ``[start, end)`` (rows of the first dimension), contiguous for the wire."""
    return None if prompts is None else prompts[start:end].contiguous()


def _timeout(peer_id: str, step_id: int, seconds: float) -> PeerFailure:
    return PeerFailure(peer_id, f"no result for step {step_id} within {seconds:.1f} s", int(ErrorCode.TIMEOUT))


def _check_inputs(hidden_size: int | None, hidden: torch.Tensor, *others: torch.Tensor | None) -> None:
    """What any node would refuse about our own inputs is refused here, before anything is sent
    (spec/messages.md §7.2: ``HIDDEN_SIZE_MISMATCH``, ``NON_FINITE``), so that no node is blamed for it."""
    if hidden_size is not None and int(hidden.shape[-1]) != hidden_size:
        raise RequestError.before_sending(f"hidden states of width {hidden.shape[-1]}; the model's is {hidden_size}",
                                          ErrorCode.HIDDEN_SIZE_MISMATCH)
    for t in (hidden, *others):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise RequestError.before_sending("an input holds NaN or infinity (spec/messages.md §7.3)",
                                              ErrorCode.NON_FINITE)


def _check_length(what: str, tokens: int, max_positions: int | None) -> None:
    """A session or sequence longer than the protocol (``MAX_SEQUENCE_LENGTH``, spec/tensors.md §2) or the
    model's positions (its context; every node would answer ``LIMIT_EXCEEDED``) is refused before sending."""
    if tokens > MAX_SEQUENCE_LENGTH:
        raise RequestError.before_sending(f"{what} {tokens} tokens; at most MAX_SEQUENCE_LENGTH = {MAX_SEQUENCE_LENGTH}")
    if max_positions is not None and tokens > max_positions:
        raise RequestError.before_sending(f"{what} {tokens} tokens; the model has {max_positions} positions (its "
                                          "context)")


def _check_shape(peer_id: str, what: str, got: torch.Tensor, want: tuple[int, ...]) -> None:
    """An answer of the wrong shape is the node's failure (§5.5), never an abort."""
    if tuple(got.shape) != tuple(want):
        raise PeerFailure(peer_id, f"{what} of shape {list(got.shape)} for an input of {list(want)}",
                          int(ErrorCode.INVALID_TENSOR))


# ---------------------------------------------------------------------------------------- sessions


class SessionChain(_Machine):
    """An inference session over blocks ``[0, n_blocks)`` for ``batch_size`` sequences of at most
    ``max_length`` columns: a chain of ``ChainSpan`` sessions (spec/messages.md §5)."""

    def __init__(self, n_blocks: int, max_length: int, batch_size: int, *, deadline: DeadlineRule,
                 max_failovers: int = 8, use_push: bool = True, chunking: Chunking = Chunking(),
                 hidden_size: int | None = None, max_positions: int | None = None) -> None:
        super().__init__(max_failovers)
        if not 1 <= batch_size <= MAX_BATCH:
            raise RequestError.before_sending(f"a session of {batch_size} sequences; at most MAX_BATCH = {MAX_BATCH}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        _check_length("a session of max_length", max_length, max_positions)
        self.chunking = chunking
        self.hidden_size = hidden_size  # the model's, when known: a step of another width is refused
        self.n_blocks = n_blocks
        self.max_length = max_length
        self.batch_size = batch_size
        self.deadline = deadline
        self.use_push = use_push
        self.spans: list[ChainSpan] = []
        self.position = 0  # columns every span holds (padding included, §5.6)
        self.last_step_id = 0  # the greatest step id sent on the chain: ids only grow, rollbacks included (§5.7)
        self.rolled_back = False  # ``crop`` cut the position: the next step carries ``truncate`` (§5.6.1)
        self.failovers = 0  # replacements done, over the session's life
        self.moves = 0  # voluntary replacements of slow spans (``move``), over the session's life
        self.timings: list[SpanTiming] = []  # each span's own time of the last step (client/measurements.py)
        self.closed = False

    # ------------------------------------------------------------------ operations

    def open(self, now: float) -> None:
        """Open sessions over all blocks; ``Finished(None)`` when done."""
        if self.closed:
            raise SwarmError("the inference session is closed")
        self._start(self._open_all(), now)

    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
             now: float) -> None:
        """Run ``hidden`` ``[batch, tokens, hidden]`` (the next tokens) through every span;
        ``Finished(outputs)`` when done. ``mask``: ``[batch, tokens]`` padding of these tokens
        (1 = token), or None (§8.1). ``prompts``: deep prompts ``[N, batch, P <= tokens, hidden]``
        for all blocks (§5.3). Invalid input raises ``ValueError`` here, before anything is sent."""
        if self.closed:
            raise SwarmError("the inference session is closed")
        if hidden.ndim != 3:
            raise ValueError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        if batch != self.batch_size:
            raise ValueError(f"this session holds {self.batch_size} sequence(s), the step has {batch}")
        if tokens < 1:
            raise ValueError("a step needs at least one token")
        if self.position + tokens > self.max_length:
            raise ValueError(
                f"the session's max_length is {self.max_length}: {self.position} tokens so far plus {tokens} new do "
                "not fit; open a session with a larger max_length"
            )
        if mask is not None:
            if tuple(mask.shape) != (batch, tokens):
                raise ValueError(f"the step's mask must be [{batch}, {tokens}], got {list(mask.shape)}")
            mask = mask.detach().to(device="cpu", dtype=torch.bool)
            if bool(mask.all()):
                mask = None  # no padding: the same as no mask (§8.1)
        if prompts is not None:
            n = self.n_blocks
            if prompts.ndim != 4 or tuple(prompts.shape[:2]) != (n, batch) or prompts.shape[3] != hidden.shape[2] \
                    or not 0 < prompts.shape[2] <= tokens:
                raise ValueError(f"prompts must be [{n}, {batch}, P <= {tokens}, {hidden.shape[2]}], "
                                 f"got {list(prompts.shape)}")
            prompts = prompts.detach().to(hidden.dtype)
        _check_inputs(self.hidden_size, hidden, prompts)
        size = self.chunking.step_tokens(batch, int(hidden.shape[2]), self.n_blocks if prompts is not None else 0)
        if size < 1:
            raise RequestError.before_sending(
                f"one token of {batch} sequences at hidden size {hidden.shape[2]} is over one message's limits "
                "(spec/tensors.md §2): use a smaller batch")
        self.timings = []
        self._start(self._chunked(hidden, mask, prompts, size), now)

    def crop(self, position: int) -> None:
        """Roll the session back to ``position`` columns (speculative decoding, spec/messages.md §5.6.1):
        every span's history is cut to what it holds below ``position`` (so a replay after a failover
        rebuilds exactly the kept columns), and the next step carries ``truncate`` so that every node
        cuts its cache too. Nothing is sent now. ``RequestError`` when a node of the chain does not
        accept ``truncate`` (its ``SessionOpened`` said nothing of ``rollback``)."""
        if self.closed:
            raise SwarmError("the inference session is closed")
        if self.busy:
            raise RuntimeError(f"an operation is under way ({self.action})")
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot roll back to {position}: the session holds {self.position} columns")
        if position == self.position:
            return
        self.check_rollback()
        for s in self.spans:
            s.history = cut_history(s.history, position)
        self.position = position
        self.rolled_back = True

    def check_rollback(self) -> None:
        """``RequestError`` naming the nodes of the chain that do not accept ``truncate`` (their
        ``SessionOpened`` lacked ``rollback``, spec/messages.md §5.6.1): no rollback is possible
        (``RollbackUnsupportedError``, a ``RequestError``)."""
        old = [s.peer_id for s in self.spans if not s.rollback]
        if old:
            raise RollbackUnsupportedError.before_sending(
                f"node(s) {', '.join(old)} on the route do not accept cache rollback (spec/messages.md §5.6.1, "
                "revision 4), which speculative decoding needs", ErrorCode.BAD_POSITION)

    def move(self, index: int, reason: str, now: float) -> None:
        """Replace ``spans[index]``, measured too slow (client/measurements.py ``slow_span``), between
        steps; ``Finished(True)`` if it moved, ``Finished(False)`` if it stayed (no other route opened)."""
        if self.closed:
            raise SwarmError("the inference session is closed")
        if not 0 <= index < len(self.spans):
            raise ValueError(f"no span {index} in a chain of {len(self.spans)}")
        self._start(self._move(index, reason), now)

    def close(self) -> list[ChainSpan]:
        """End the session; returns the spans for the driver to close."""
        self.closed = True
        self._rules, self.action = None, None
        spans, self.spans = self.spans, []
        for s in spans:
            s.abandoned = True
        return spans

    # ------------------------------------------------------------------ reports

    def opened(self, spans: list[ChainSpan], failures: list[PeerFailure], now: float) -> None:
        """The sessions of the route that opened, and the nodes that failed to open one."""
        self._resume(now, self._expect(OpenSpans).send, (spans, failures))

    def result(self, span: ChainSpan, step_id: int, hidden: torch.Tensor, now: float) -> None:
        """``span``'s node sent the ``StepResult`` of ``step_id`` (whenever it arrives)."""
        if span.abandoned or span.failure is not None:
            return  # a late answer of a node we no longer use
        sent = span.expected.pop(step_id, None)
        if sent is None:
            self.span_failed(span, PeerFailure(span.peer_id, f"sent a result for step {step_id}, which it was not "
                                               "asked for", int(ErrorCode.INVALID_FIELD)), now)
            return
        span.step_seconds[:] = [*span.step_seconds[-(MEASURED_STEPS - 1):], now - sent]
        span.timed[step_id] = (sent, now)
        action = self.action
        if isinstance(action, WaitResult) and action.span is span and action.step_id == step_id:
            self._resume(now, self._rules.send, hidden)  # type: ignore[union-attr]
        else:
            span.arrived[step_id] = hidden

    def span_failed(self, span: ChainSpan, failure: PeerFailure, now: float) -> None:
        """``span``'s session failed (stream lost, an ``Error``, an invalid message, a failed send)."""
        if span.abandoned or span.failure is not None:
            return
        span.failure = failure
        action = self.action
        if isinstance(action, (WaitResult, SendStep)) and action.span is span:
            self._resume(now, self._rules.throw, failure)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ rules

    def _open_all(self) -> _Rules:
        budget = FailoverBudget(self.max_failovers, f"opening sessions for blocks 0:{self.n_blocks}")
        self.spans = yield from self._open_route(0, self.n_blocks, budget)

    def _open_route(self, start: int, end: int, budget: FailoverBudget, upstream: str | None = None) -> _Rules:
        """Sessions covering ``[start, end)``, the first bound to ``upstream`` (§5.10); re-routes around
        nodes that refuse or fail to open."""
        force = False
        while True:
            opened, failures = yield from self._route(OpenSpans(start, end, force, upstream, self.use_push), budget)
            if not failures:
                return opened
            yield from self._abandon(opened, close=True)
            for failure in failures:
                yield from self._fail(failure, budget, start, end)
            force = True

    def _abandon(self, spans: list[ChainSpan], close: bool = False) -> _Rules:
        for s in spans:
            s.abandoned = True
        if spans:
            yield Abandon(tuple(spans), close)

    def _send(self, span: ChainSpan, step_id: int, position: int, x: torch.Tensor, hops: list[ChainSpan],
              mask: torch.Tensor | None, prompts: torch.Tensor | None, deadline: float,
              truncate: bool = False) -> _Rules:
        """Send one step to ``span`` (with push to ``hops``): from now on their results are asked for."""
        if span.failure is not None:
            raise span.failure
        for s in (span, *hops):
            s.expected[step_id] = self.now
        yield SendStep(span, step_id, position, x, tuple(hops), mask, prompts, deadline, truncate)

    def _result(self, span: ChainSpan, step_id: int, deadline: float) -> _Rules:
        """``span``'s result of ``step_id``: arrived already, or waited for until ``deadline``."""
        if step_id in span.arrived:
            return span.arrived.pop(step_id)
        if span.failure is not None:
            raise span.failure
        return (yield WaitResult(span, step_id, deadline))

    def _chunked(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                 size: int) -> _Rules:
        """The step as consecutive steps of at most ``size`` tokens (client/chunking.py): each gets its
        columns of the mask and of the deep prompts (which cover the step's first ``prefix`` tokens)."""
        outs = []
        for a, b in pieces(int(hidden.shape[1]), size):
            part_mask = None if mask is None or bool(mask[:, a:b].all()) else mask[:, a:b]
            part_prompts = None
            if prompts is not None and a < prompts.shape[2]:
                part_prompts = prompts[:, :, a:b].contiguous()
            outs.append((yield from self._step(hidden[:, a:b].contiguous(), part_mask, part_prompts)))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _step(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None) -> _Rules:
        if not self.spans:
            yield from self._open_all()
        batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
        position = self.position
        # ``position + 1`` while the session only grows; after a rollback, above every id sent (§5.6.1)
        step_id = max(position + 1, self.last_step_id + 1)
        self.last_step_id = step_id
        truncate = self.rolled_back
        budget = FailoverBudget(self.max_failovers, f"the step at position {position}")
        x = hidden
        i = 0
        send_from = 0  # index to (re)send the step to, with push to the rest; -1: already sent
        ready = -float("inf")  # when the current span's input was available (the previous result)
        asked_directly: set[int] = set()  # spans that got this step from us, not by push
        while i < len(self.spans):
            span = self.spans[i]
            seconds = self.deadline(span.server, span.start, span.end, batch, tokens)
            deadline = self.now + seconds
            try:
                try:
                    if send_from == i:
                        hops = self.spans[i + 1:] if self.use_push else []
                        last = hops[-1].end if hops else span.end
                        asked_directly.add(i)
                        yield from self._send(span, step_id, position, x, hops, mask,
                                              _blocks(prompts, span.start, last), deadline, truncate)
                        send_from = -1 if self.use_push else i + 1
                    out = yield from self._result(span, step_id, deadline)
                except _DeadlinePassed:
                    if i not in asked_directly:
                        send_from = i  # maybe only the push was lost: ask this node directly once (§5.7)
                        continue
                    raise _timeout(span.peer_id, step_id, seconds) from None
                _check_shape(span.peer_id, "a StepResult", out, tuple(x.shape))
            except PeerFailure as failure:
                yield from self._replace(i, failure, budget)
                send_from = i
                asked_directly.discard(i)
                continue
            span.history.append(Fed(step_id, position, x, mask, _blocks(prompts, span.start, span.end)))
            sent, at = span.timed.pop(step_id, (self.now, self.now))
            self.timings.append(SpanTiming(span.peer_id, span.end - span.start, tokens, at - max(sent, ready)))
            span.decode_steps += tokens == 1
            ready = at
            x = out
            i += 1
        self.position = position + tokens
        self.rolled_back = False
        return x

    def _replace(self, i: int, failure: PeerFailure, budget: FailoverBudget) -> _Rules:
        """``spans[i]`` failed: avoid its node, open sessions over its blocks elsewhere and replay its history."""
        old = self.spans[i]
        old.failure = old.failure or failure
        yield from self._fail(failure, budget, old.start, old.end)
        yield from self._abandon([old])
        self.failovers += 1
        while True:
            new = yield from self._open_route(old.start, old.end, budget, self.spans[i - 1].peer_id if i else None)
            try:
                yield from self._replay(old, new)
            except PeerFailure as again:
                yield from self._abandon(new)
                yield from self._fail(again, budget, old.start, old.end)
                continue
            break
        self.spans[i:i + 1] = new
        after = i + len(new)
        if self.use_push and after < len(self.spans):
            # the session after pushes from the replacement now (§5.10), before the step is resent
            yield Rebind(self.spans[after], new[-1].peer_id)

    def _move(self, i: int, reason: str) -> _Rules:
        """Make before break: open and replay sessions over ``spans[i]``'s blocks elsewhere, then close it.
        Any failure on the way keeps the slow span (the failed new nodes are avoided as usual)."""
        old = self.spans[i]
        budget = FailoverBudget(self.max_failovers, f"moving blocks {old.start}:{old.end} off a slow node ({reason})")
        new: list[ChainSpan] = []
        try:
            new = yield from self._open_route(old.start, old.end, budget, self.spans[i - 1].peer_id if i else None)
            if any(s.peer_id == old.peer_id for s in new):
                raise SwarmError("the route chose the same node again")
            yield from self._replay(old, new)
        except PeerFailure as failure:
            yield Avoid(failure)
            yield from self._abandon(new)
            return False
        except (SwarmError, MissingBlocksError):
            yield from self._abandon(new, close=True)
            return False
        yield from self._abandon([old], close=True)
        self.spans[i:i + 1] = new
        self.moves += 1
        after = i + len(new)
        if self.use_push and after < len(self.spans):
            yield Rebind(self.spans[after], new[-1].peer_id)  # §5.10, as after a failover
        return True

    def _replay(self, old: ChainSpan, new: list[ChainSpan]) -> _Rules:
        """The replay plan (§5.9): every step ``old`` processed, in order, in its original chunk,
        position and step id, through the sub-spans of ``new`` in turn (no push); each sub-span gets
        its own blocks' prompts. Rebuilds the KV caches exactly as they were."""
        for fed in old.history:
            x = fed.hidden
            batch, tokens = int(x.shape[0]), int(x.shape[1])
            for s in new:
                part = _blocks(fed.prompts, s.start - old.start, s.end - old.start)
                seconds = self.deadline(s.server, s.start, s.end, batch, tokens)
                deadline = self.now + seconds
                try:
                    yield from self._send(s, fed.step_id, fed.position, x, [], fed.mask, part, deadline)
                    out = yield from self._result(s, fed.step_id, deadline)
                except _DeadlinePassed:
                    raise _timeout(s.peer_id, fed.step_id, seconds) from None
                _check_shape(s.peer_id, "a StepResult", out, tuple(x.shape))
                s.timed.pop(fed.step_id, None)
                s.history.append(Fed(fed.step_id, fed.position, x, fed.mask, part))
                x = out


# ---------------------------------------------------------------------------------------- forward / backward


class CallChain(_Machine):
    """Stateless ``Forward``/``Backward`` calls through blocks ``[0, n_blocks)`` (spec/messages.md §6).

    ``forward(...)`` finishes with ``(outputs, trace)``, ``trace`` being ``(span, input)`` of every
    span used; ``backward(trace, ...)`` finishes with ``(grad_inputs, grad_prompts)``."""

    def __init__(self, n_blocks: int, *, timeout: float, max_failovers: int = 8,
                 chunking: Chunking = Chunking(), hidden_size: int | None = None,
                 max_positions: int | None = None) -> None:
        super().__init__(max_failovers)
        self.max_positions = max_positions  # the model's, when known
        self.n_blocks = n_blocks
        self.timeout = timeout
        self.chunking = chunking
        self.hidden_size = hidden_size  # the model's, when known
        self.rows = 0  # sequences per call (client/chunking.py), set by forward()/backward()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                now: float) -> None:
        _check_inputs(self.hidden_size, hidden, prompts)
        self._start(self._forward(hidden, mask, prompts, self._rows(hidden, prompts)), now)

    def backward(self, trace: list[tuple[RouteSpan, torch.Tensor]], grad: torch.Tensor, mask: torch.Tensor | None,
                 prompts: torch.Tensor | None, now: float) -> None:
        _check_inputs(self.hidden_size, grad, prompts)
        self._start(self._backward(trace, grad, mask, prompts, self._rows(grad, prompts)), now)

    def _rows(self, hidden: torch.Tensor, prompts: torch.Tensor | None) -> int:
        """Sequences per ``Forward``/``Backward`` message: one rule for both directions (a backward
        carries inputs and gradients), so a forward's groups are also its backward's."""
        tokens, width = int(hidden.shape[1]), int(hidden.shape[2])
        _check_length("a sequence of", tokens, self.max_positions)
        blocks, prefix = (0, 0) if prompts is None else (self.n_blocks, int(prompts.shape[2]))
        rows = self.chunking.call_rows(tokens, width, 2, blocks, prefix)
        if rows < 1:
            raise RequestError.before_sending(self.chunking.call_refusal(tokens, width, blocks, prefix))
        return rows

    # ------------------------------------------------------------------ reports

    def routed(self, route: list[RouteSpan], now: float) -> None:
        self._resume(now, self._expect(Route).send, route)

    def returned(self, value: Any, now: float) -> None:
        """The call under way answered: ``hidden`` (Forward) or ``(grad_inputs, grad_prompts)`` (Backward)."""
        self._resume(now, self._expect(CallForward, CallBackward).send, value)

    def failed(self, failure: PeerFailure, now: float) -> None:
        """The call under way failed."""
        self._resume(now, self._expect(CallForward, CallBackward).throw, failure)

    # ------------------------------------------------------------------ rules

    def _call(self, action: CallForward | CallBackward) -> _Rules:
        try:
            return (yield action)
        except _DeadlinePassed:
            raise PeerFailure(action.span.peer_id, f"no answer within {self.timeout:.1f} s",
                              int(ErrorCode.TIMEOUT)) from None

    def _groups(self, x: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None):
        """``(rows, x, mask, prompts)`` of each group of at most ``self.rows`` sequences."""
        for a, b in pieces(int(x.shape[0]), self.rows):
            if (a, b) == (0, int(x.shape[0])):
                yield slice(a, b), x, mask, prompts
                continue
            part_mask = None if mask is None or bool(mask[a:b].all()) else mask[a:b]
            yield slice(a, b), x[a:b], part_mask, None if prompts is None else prompts[:, a:b].contiguous()

    def _forward_one(self, r: RouteSpan, x: torch.Tensor, mask: torch.Tensor | None,
                     prompts: torch.Tensor | None) -> _Rules:
        """``x`` through span ``r``: one ``Forward`` per group of sequences (client/chunking.py)."""
        outs = []
        for _, xs, ms, ps in self._groups(x, mask, _blocks(prompts, r.start, r.end)):
            out = yield from self._call(CallForward(r, xs, ms, ps, self.now + self.timeout))
            _check_shape(r.peer_id, "a ForwardResult", out, tuple(xs.shape))
            outs.append(out.to(x.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor | None,
                 rows: int) -> _Rules:
        self.rows = rows  # set once the operation started (never while another is under way)
        budget = FailoverBudget(self.max_failovers, "the forward pass")
        trace: list[tuple[RouteSpan, torch.Tensor]] = []
        x = hidden
        block, force = 0, False
        while block < self.n_blocks:
            route = yield from self._route(Route(block, self.n_blocks, force), budget)
            for r in route:
                try:
                    out = yield from self._forward_one(r, x, mask, prompts)
                except PeerFailure as failure:
                    yield from self._fail(failure, budget, r.start, r.end)
                    force = True
                    break  # re-route from this block on
                trace.append((r, x))
                x = out
                block = r.end
        return x, trace

    def _backward(self, trace: list[tuple[RouteSpan, torch.Tensor]], grad: torch.Tensor,
                  mask: torch.Tensor | None, prompts: torch.Tensor | None, rows: int) -> _Rules:
        self.rows = rows
        budget = FailoverBudget(self.max_failovers, "the backward pass")
        grad_prompts = None if prompts is None else torch.zeros_like(prompts)
        for r, x in reversed(trace):
            route = [r]
            while True:
                try:
                    g, parts = yield from self._backward_route(route, x, grad, mask, prompts)
                    break
                except PeerFailure as failure:
                    yield from self._fail(failure, budget, r.start, r.end)
                    route = yield from self._route(Route(r.start, r.end, True), budget)
            grad = g
            if grad_prompts is not None:  # written once the whole sub-chain succeeded: a retry never adds twice
                for part, gp in parts:
                    grad_prompts[part.start:part.end] = gp.to(grad_prompts.dtype)
        return grad, grad_prompts

    def _backward_route(self, route: list[RouteSpan], x: torch.Tensor, g: torch.Tensor, mask: torch.Tensor | None,
                        prompts: torch.Tensor | None) -> _Rules:
        """Backward through ``route`` from input ``x``; a route of several spans (a re-routed span split
        over nodes) first runs forward to get each part's input."""
        inputs = [x]
        for r in route[:-1]:
            inputs.append((yield from self._forward_one(r, inputs[-1], mask, prompts)))
        parts = []
        for r, inp in zip(reversed(route), reversed(inputs)):
            span_prompts = _blocks(prompts, r.start, r.end)
            grads, grad_prompts = [], []
            for rows, xs, ms, ps in self._groups(inp, mask, span_prompts):
                gi, gp = yield from self._call(CallBackward(r, xs, g[rows], ms, ps, self.now + self.timeout))
                _check_shape(r.peer_id, "a BackwardResult", gi, tuple(xs.shape))
                if ps is not None:
                    if gp is None:
                        raise PeerFailure(r.peer_id, "a BackwardResult without grad_prompts",
                                          int(ErrorCode.INVALID_TENSOR))
                    _check_shape(r.peer_id, "BackwardResult grad_prompts", gp, tuple(ps.shape))
                    grad_prompts.append(gp)
                elif gp is not None:
                    raise PeerFailure(r.peer_id, "a BackwardResult with grad_prompts for a call without prompts",
                                      int(ErrorCode.INVALID_TENSOR))
                grads.append(gi.to(x.dtype))
            g = grads[0] if len(grads) == 1 else torch.cat(grads)
            gp = None if not grad_prompts else grad_prompts[0] if len(grad_prompts) == 1 else torch.cat(grad_prompts, 1)
            parts.append((r, gp))
        return g, parts
