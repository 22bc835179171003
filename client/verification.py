"""Verified computation: which steps to check, on which replica, within what tolerance, and who lied.

Sans-IO (issue 20 item 5): no sockets, no asyncio, no clock, no randomness of its own; the
driver (client/verifying.py) passes ``now`` and uniform draws in, asks the replicas and reports
their answers. The rules:

- **sampling** (``should_check``): each span of each inference step (and each span of a stateless
  ``Forward`` or ``Backward``) is checked with probability ``rate`` (``ClientConfig.verify``); 1.0 is the paranoid
  mode, every step of every span; 0 checks nothing.
- **replicas** (``pick_replica``): an independent replica of a span ``[start, end)`` is another node
  that serves all of those blocks, with the same weight quantisation (a quantised replica computes
  something else), online, not avoided, not a proven liar, and not already asked in this check.
  None: the driver says so once per span (WARNING) and carries on unverified, never silently.
- **tolerance** (``tolerance``; spec/tensors.md §10): two honest nodes agree on every position of a
  span's output within a relative L2 error derived from the wire codec and the nodes' compute dtype.
- **arbitration** (``Check``): the checked node's output is compared with a replica's recomputation;
  on disagreement a third node decides: the one of the two that disagrees with the arbiter lied. No
  arbiter, or an arbiter that agrees with neither, leaves the check unresolved: the evidence is
  logged and nobody is avoided (two nodes' word against each other proves nothing).
- **avoidance** (``Verifier``): a node found lying is avoided for the rest of the client's life (routes
  never use it again; spec/messages.md §5.9's failover and replay rebuild what it touched), and the
  evidence (``Evidence``: span, positions, input digest, both outputs, peer ids, time) is kept for the
  driver to write (a JSONL line plus the tensors, in ``ClientConfig.verify_evidence_dir``) and log.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .routing import ServerSpan

__all__ = [
    "Check", "Evidence", "Verifier", "VerifyParams", "compare", "input_digest", "pick_replica", "rebuilt_records",
    "should_check",
    "tolerance", "unit_roundoff",
]

# Unit roundoff u = 2^-p of each floating format (p = significand bits incl. the hidden one, minus 1):
# a value rounded to the format is within a relative u of what was rounded.
_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
_CODEC_DTYPE = {"f32": "float32", "f16": "float16", "f16+zstd": "float16", "bf16": "bfloat16"}

DEFAULT_VERIFY = 0.0  # ClientConfig.verify's default; README "Verified computation" argues it
WIRE_TERMS = 4.0  # each output rounded to the wire codec once per node (2), on inputs already on the grid (x2 slack)
ROW_FLOOR = 1e-3  # compare(): a row's norm counts as at least this fraction of the largest row's
# x sqrt(blocks) x u of the compute dtype: two evaluation orders (a cached step vs one Forward). Measured
# constants (benchmarks/bench_verify.py, err / (u sqrt(L))): float32 1.0-11 (grows with the width and the
# context: the accumulation order of long dot products), float16 0.4-1.3 and bfloat16 0.4-1.2 (each op's
# output rounding dominates); the factors leave 12x or more over the largest.
COMPUTE_FACTOR = {"float32": 256.0, "float16": 16.0, "bfloat16": 16.0}


def unit_roundoff(name: str) -> float:
    """``u`` of a dtype (``"float32"``, ``"float16"``, ``"bfloat16"``) or wire codec (``"f32"``, ``"f16"``,
    ``"f16+zstd"``, ``"bf16"``); an unknown name counts as the coarsest (bfloat16)."""
    return _ROUNDOFF.get(_CODEC_DTYPE.get(name, name), _ROUNDOFF["bfloat16"])


def tolerance(codec: str, dtypes: Iterable[str], blocks: int) -> float:
    """The largest relative L2 error between two honest outputs of ``blocks`` blocks (spec/tensors.md §10).

    ``tol = WIRE_TERMS * u(codec) + sqrt(blocks) * max COMPUTE_FACTOR[d] * u(d)``:
    each node rounds its output to the wire codec once (relative error <= u(codec) per element, so <= u
    in L2 for the row), and the two nodes compute the same function in a different order (a session's
    cached step against a ``Forward`` of the whole history), whose rounding errors grow like a random walk
    over the blocks' residual stream (sqrt(blocks)) with a constant measured per dtype (``COMPUTE_FACTOR``).
    8 blocks: float32 nodes on the f32 wire 4.3e-5 (worst honest error measured 1.9e-6), on the f16 wire
    2.0e-3; float16 nodes 2.4e-2, bfloat16 nodes 0.18. A corruption smaller than the tolerance is not
    detected; an unknown dtype counts as bfloat16.
    """
    dtypes = list(dtypes) or ["bfloat16"]
    compute = max(COMPUTE_FACTOR.get(d, COMPUTE_FACTOR["bfloat16"]) * unit_roundoff(d) for d in dtypes)
    return WIRE_TERMS * unit_roundoff(codec) + math.sqrt(max(1, blocks)) * compute


def compare(output: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """The worst relative L2 error ``|output - reference| / |reference|`` over the rows (``[batch, tokens,
    hidden]`` -> one row per token), padding columns (``mask`` 0) left out; a row's norm counts as at least
    ``ROW_FLOOR`` x the largest row's (a gradient's row may be all but zero). A shape mismatch or a
    non-finite value is an infinite error."""
    if tuple(output.shape) != tuple(reference.shape):
        return math.inf
    a, b = output.detach().double(), reference.detach().double()
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return math.inf
    if b.numel() == 0:
        return 0.0
    norms = b.norm(dim=-1)
    err = (a - b).norm(dim=-1) / norms.clamp_min(max(1e-30, ROW_FLOOR * float(norms.max())))
    if mask is not None:
        err = err[mask.to(torch.bool)]
    return float(err.max()) if err.numel() else 0.0


def input_digest(hidden: torch.Tensor) -> str:
    """sha256 of a tensor's float32 little-endian bytes, with its shape: names an input in the evidence."""
    data = hidden.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return "sha256:" + hashlib.sha256(repr(list(hidden.shape)).encode() + data).hexdigest()


def should_check(rate: float, draw: float) -> bool:
    """Check this span of this step? ``draw``: uniform in ``[0, 1)`` (the driver's randomness)."""
    return draw < rate


def pick_replica(servers: Iterable[ServerSpan], start: int, end: int, *, quant: str, exclude: Iterable[str],
                 avoided: Iterable[str], adapter: str | None, draw: float) -> ServerSpan | None:
    """A node that can recompute blocks ``[start, end)`` on its own, chosen by ``draw`` in ``[0, 1)`` among
    the eligible ones (sorted by peer id, so that the choice depends only on ``draw``); None: there is none."""
    skip = set(exclude) | set(avoided)
    eligible = sorted((s for s in servers
                       if s.start <= start and end <= s.end and s.online and s.peer_id not in skip
                       and s.quant == quant and (adapter is None or adapter in s.adapters)),
                      key=lambda s: s.peer_id)
    if not eligible:
        return None
    return eligible[min(len(eligible) - 1, int(draw * len(eligible)))]


def rebuilt_records(spans: list, index: int, first: int, replayed: list) -> list:
    """After ``SessionChain.rebuild(index)``: ``(span, fed, output)`` of the rebuilt spans ``spans[index:]``
    for the step's columns (positions from ``first`` on), as ``SessionChain.records`` has them after a step,
    so that they are checked in turn. ``replayed``: the rebuild's ``(fed, output of the last block)``."""
    final = {fed.step_id: out for fed, out in replayed}
    records = []
    for j in range(index, len(spans)):
        after = spans[j + 1] if j + 1 < len(spans) else None
        for fed in spans[j].history:
            if fed.position < first:
                continue
            if after is None:
                out = final.get(fed.step_id)
            else:
                out = next((f.hidden for f in after.history if f.step_id == fed.step_id), None)
            if out is not None:
                records.append((spans[j], fed, out))
    return records


# ---------------------------------------------------------------------------------------- one check


@dataclass(frozen=True)
class VerifyParams:
    """How much to verify (named limits; ``ClientConfig.verify*``)."""

    rate: float = DEFAULT_VERIFY  # fraction of steps (per span) recomputed on a replica; 1.0 = paranoid
    tolerance: float | None = None  # relative L2 bound; None: ``tolerance(codec, dtypes, blocks)``
    evidence_dir: str | None = None  # where the driver writes evidence (JSONL + tensors); None: the log only

    def __post_init__(self) -> None:
        if not (isinstance(self.rate, (int, float)) and 0.0 <= self.rate <= 1.0):
            raise ValueError(f"verify must be a rate in [0, 1] (0.05: one step in 20; 1.0: every step), got {self.rate!r}")
        if self.tolerance is not None and not (self.tolerance > 0 and math.isfinite(self.tolerance)):
            raise ValueError(f"verify_tolerance must be a positive number, got {self.tolerance!r}")


@dataclass
class Evidence:
    """What a check saw (a JSON record plus its tensors); ``verdict``: "liar", "replica-liar" or "unresolved"."""

    verdict: str
    kind: str  # "step" (an inference session's step) or "forward" (a stateless Forward)
    start: int
    end: int
    positions: tuple[int, int]  # the checked columns [a, b)
    input_digest: str
    accused: str  # the node that answered first (the one checked)
    replica: str | None
    arbiter: str | None
    errors: dict[str, float]  # "replica", "arbiter_vs_accused", "arbiter_vs_replica": relative L2
    tolerance: float
    time: float  # wall clock (seconds since the epoch), passed in
    liar: str | None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # input, outputs

    def record(self) -> dict:
        """The JSON line (the tensors are written beside it; their file is named by the driver)."""
        out = {k: getattr(self, k) for k in ("verdict", "kind", "start", "end", "input_digest", "accused", "replica",
                                             "arbiter", "tolerance", "time", "liar")}
        out["positions"] = list(self.positions)
        out["errors"] = {k: (v if math.isfinite(v) else "inf") for k, v in self.errors.items()}
        return out


class Check:
    """The arbitration plan of one checked output: ask a replica; on disagreement ask an arbiter.

    ``wanted()`` says which peers the next node must not be (None: decided); report each node's
    recomputation with ``answer(peer, output)`` or ``unavailable()`` when there is nobody (left) to ask.
    ``verdict`` is then ``"ok"``, ``"liar"`` (the checked node), ``"replica-liar"`` or ``"unresolved"``."""

    def __init__(self, accused: str, output: torch.Tensor, tol: float, mask: torch.Tensor | None = None) -> None:
        self.accused = accused
        self.output = output
        self.tol = tol
        self.mask = mask
        self.replica: tuple[str, torch.Tensor] | None = None
        self.arbiter: tuple[str, torch.Tensor] | None = None
        self.errors: dict[str, float] = {}
        self.verdict: str | None = None

    @property
    def liar(self) -> str | None:
        if self.verdict == "liar":
            return self.accused
        if self.verdict == "replica-liar" and self.replica is not None:
            return self.replica[0]
        return None

    def wanted(self) -> tuple[str, ...] | None:
        """Peers the next node asked must differ from; None once the verdict is known."""
        if self.verdict is not None:
            return None
        return (self.accused,) if self.replica is None else (self.accused, self.replica[0])

    def unavailable(self) -> None:
        """Nobody (left) to ask: no replica means unverified (the driver warns), no arbiter unresolved."""
        if self.verdict is None:
            self.verdict = "unverified" if self.replica is None else "unresolved"

    def answer(self, peer: str, output: torch.Tensor) -> None:
        if self.verdict is not None:
            raise RuntimeError("the check is decided")
        if self.replica is None:
            self.replica = (peer, output)
            self.errors["replica"] = compare(self.output, output, self.mask)
            if self.errors["replica"] <= self.tol:
                self.verdict = "ok"
            return
        self.arbiter = (peer, output)
        vs_accused = self.errors["arbiter_vs_accused"] = compare(self.output, output, self.mask)
        vs_replica = self.errors["arbiter_vs_replica"] = compare(self.replica[1], output, self.mask)
        if vs_replica <= self.tol < vs_accused:
            self.verdict = "liar"
        elif vs_accused <= self.tol < vs_replica:
            self.verdict = "replica-liar"
        else:
            self.verdict = "unresolved"

    def evidence(self, kind: str, start: int, end: int, positions: tuple[int, int], inputs: torch.Tensor,
                 now: float) -> Evidence:
        tensors = {"inputs": inputs, "accused_output": self.output}
        if self.replica is not None:
            tensors["replica_output"] = self.replica[1]
        if self.arbiter is not None:
            tensors["arbiter_output"] = self.arbiter[1]
        return Evidence(verdict=str(self.verdict), kind=kind, start=start, end=end, positions=positions,
                        input_digest=input_digest(inputs), accused=self.accused,
                        replica=None if self.replica is None else self.replica[0],
                        arbiter=None if self.arbiter is None else self.arbiter[0], errors=dict(self.errors),
                        tolerance=self.tol, time=now, liar=self.liar, tensors=tensors)


# ---------------------------------------------------------------------------------------- the client's memory


class Verifier:
    """The client's verification state for its whole life: the rate, the proven liars, what was said once."""

    def __init__(self, params: VerifyParams) -> None:
        self.params = params
        self.liars: dict[str, Evidence] = {}
        self.unverified: set[tuple[int, int]] = set()  # spans already reported as without a replica
        self.checks = 0  # outputs compared with a replica
        self.disagreements = 0
        self.worst_agreement = 0.0  # largest relative error two agreeing nodes showed (against the tolerance)

    @property
    def enabled(self) -> bool:
        return self.params.rate > 0

    def is_liar(self, peer_id: str) -> bool:
        return peer_id in self.liars

    def tolerance(self, codec: str, dtypes: Iterable[str], blocks: int) -> float:
        return self.params.tolerance if self.params.tolerance is not None else tolerance(codec, dtypes, blocks)

    def first_unverified(self, start: int, end: int) -> bool:
        """True the first time blocks ``[start, end)`` had no replica (the driver warns once)."""
        if (start, end) in self.unverified:
            return False
        self.unverified.add((start, end))
        return True

    def decided(self, check: Check, evidence: Evidence | None) -> str | None:
        """Record a finished check; returns the liar to avoid from now on, if it proved one."""
        if check.replica is not None:
            self.checks += 1
        if check.verdict == "ok":
            self.worst_agreement = max(self.worst_agreement, check.errors["replica"])
        if check.verdict not in ("ok", "unverified"):
            self.disagreements += 1
        liar = check.liar
        if liar is not None and evidence is not None:
            self.liars.setdefault(liar, evidence)
        return liar
