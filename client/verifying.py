"""The asyncio driver of verified computation (client/verification.py holds every rule).

``check_step`` checks the sampled spans of an inference step just computed (``SessionChain.records``):
each span's output of the step is compared with a replica's stateless ``Forward`` (spec/messages.md
§6.1) of that span's whole input history, at the step's columns; ``check_forward`` and
``check_backward`` do the same for the spans of a stateless forward or backward pass (the same
``Forward`` or ``Backward``, §6.2, on a replica; a backward compares the input gradients). On a disagreement a third
node arbitrates (``Check``). Both return the peers proven to lie; the callers (client/session.py,
client/remote_forward.py) rebuild what those touched. ``report`` logs a WARNING and, when
``ClientConfig.verify_evidence_dir`` is set, appends the evidence to ``evidence.jsonl`` there and
writes its tensors beside it (``<time>-<digest>.safetensors``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from .chain import ChainSpan, Fed
from .errors import PeerFailure
from .routing import RouteSpan, ServerSpan
from .verification import Check, Evidence, pick_replica, should_check

if TYPE_CHECKING:
    from .swarm import RemoteSwarm

__all__ = ["check_backward", "check_forward", "check_step", "report"]

log = logging.getLogger("biopetals.client.verify")

MAX_ASKED = 4  # replicas that may fail to answer one check before it counts as unverified


async def check_step(swarm: "RemoteSwarm", records: list[tuple[ChainSpan, Fed, torch.Tensor]]) -> set[str]:
    """Check the sampled ``(span, fed, output)`` records of one step; returns the liars found."""
    verifier = swarm.verifier
    todo = []
    for span, fed, output in records:
        if not should_check(verifier.params.rate, swarm.verify_rng.random()):
            continue
        history = _history_until(span, fed)
        if any(f.prompts is not None for f in history):
            _unverified(swarm, span.start, span.end, "steps with deep prompts are not verified")
            continue
        inputs = torch.cat([f.hidden for f in history], dim=1)
        masks = [f.mask for f in history]
        mask = None if all(m is None for m in masks) else torch.cat(
            [torch.ones(f.hidden.shape[:2], dtype=torch.bool) if m is None else m for f, m in zip(history, masks)], 1)
        a = fed.position - history[0].position
        b = a + int(fed.hidden.shape[1])

        async def forward(replica: RouteSpan, inputs=inputs, mask=mask, a=a, b=b) -> torch.Tensor:
            full = await swarm.forward(replica, inputs, swarm.config.codec, mask)
            return full[:, a:b] if tuple(full.shape) == tuple(inputs.shape) else full

        todo.append(_check(swarm, "step", span.server, span.start, span.end, inputs, output,
                           None if mask is None else mask[:, a:b], (fed.position, fed.position + b - a), forward))
    return {liar for liar in await asyncio.gather(*todo) if liar is not None}


async def check_forward(swarm: "RemoteSwarm", trace: list[tuple[RouteSpan, torch.Tensor]], out: torch.Tensor,
                        mask: torch.Tensor | None, prompts: torch.Tensor | None) -> set[str]:
    """Check the sampled spans of a forward pass (``trace``: ``(span, input)``; ``out``: the last output)."""
    verifier = swarm.verifier
    todo = []
    outputs = [x for _, x in trace[1:]] + [out]
    for (r, x), y in zip(trace, outputs):
        if not should_check(verifier.params.rate, swarm.verify_rng.random()):
            continue
        if prompts is not None:
            _unverified(swarm, r.start, r.end, "forward passes with deep prompts are not verified")
            continue
        async def forward(replica: RouteSpan, x=x) -> torch.Tensor:
            return await swarm.forward(replica, x, swarm.config.codec, mask)

        todo.append(_check(swarm, "forward", r.server, r.start, r.end, x, y, mask, (0, int(x.shape[1])), forward))
    return {liar for liar in await asyncio.gather(*todo) if liar is not None}


async def check_backward(swarm: "RemoteSwarm", records: list[tuple[RouteSpan, torch.Tensor, torch.Tensor, torch.Tensor]],
                         mask: torch.Tensor | None, prompts: torch.Tensor | None) -> set[str]:
    """Check the sampled spans of a backward pass (``CallChain.backward_records``: ``(span, input,
    grad_outputs, grad_inputs)``) with the same ``Backward`` on a replica; returns the liars found."""
    todo = []
    for r, x, grad_out, grad_in in records:
        if not should_check(swarm.verifier.params.rate, swarm.verify_rng.random()):
            continue
        if prompts is not None:
            _unverified(swarm, r.start, r.end, "backward passes with deep prompts are not verified")
            continue

        async def backward(replica: RouteSpan, x=x, grad_out=grad_out) -> torch.Tensor:
            return (await swarm.backward(replica, x, grad_out, swarm.config.codec, mask))[0]

        todo.append(_check(swarm, "backward", r.server, r.start, r.end, x, grad_in, mask, (0, int(x.shape[1])),
                           backward))
    return {liar for liar in await asyncio.gather(*todo) if liar is not None}


def _history_until(span: ChainSpan, fed: Fed) -> list[Fed]:
    """``span``'s input history up to ``fed`` included: what a replica recomputes for the step.

    ``SessionChain.records`` only names steps that the span's history holds; a step missing from
    it is a bug, and checking it alone (without the columns before it) would compare the wrong
    computation, so it raises instead of verifying anything."""
    for i, f in enumerate(span.history):
        if f is fed:
            return span.history[:i + 1]
    raise RuntimeError(
        f"internal error: the step {fed.step_id} at position {fed.position} is not in the history of blocks "
        f"{span.start}:{span.end} on {span.peer_id}; it cannot be verified (a bug in the client, please report it)"
    )


async def _check(swarm: "RemoteSwarm", kind: str, server: ServerSpan, start: int, end: int, inputs: torch.Tensor,
                 output: torch.Tensor, mask: torch.Tensor | None, positions: tuple[int, int],
                 recompute: Callable[[RouteSpan], Awaitable[torch.Tensor]]) -> str | None:
    """``output`` (of ``server`` over ``[start, end)``) checked against replicas' ``recompute`` (and an
    arbiter's); ``mask``: padding of the compared columns. Returns the liar, if proven."""
    verifier, cfg = swarm.verifier, swarm.config
    replicas_dtype = [server.dtype]
    check = Check(server.peer_id, output, 0.0, mask)
    asked: set[str] = set()
    servers = await swarm.fetch_servers()
    while (exclude := check.wanted()) is not None:
        replica = pick_replica(servers, start, end, quant=server.quant, exclude={*exclude, *asked},
                               avoided=[s.peer_id for s in servers if verifier.is_liar(s.peer_id)
                                        or swarm.health.is_banned(s.peer_id, time.monotonic())],
                               adapter=cfg.adapter, draw=swarm.verify_rng.random())
        if replica is None or len(asked) >= MAX_ASKED:
            check.unavailable()
            break
        asked.add(replica.peer_id)
        try:
            async with asyncio.timeout(cfg.forward_timeout):
                recomputed = await recompute(RouteSpan(replica, start, end))
        except (PeerFailure, TimeoutError) as exc:
            log.info("replica %s did not recompute blocks %d:%d: %s", replica.peer_id, start, end, exc)
            continue
        replicas_dtype.append(replica.dtype)
        check.tol = verifier.tolerance(cfg.codec, replicas_dtype, end - start)
        check.answer(replica.peer_id, recomputed.to(output.dtype))
    if check.verdict == "unverified":
        _unverified(swarm, start, end, "no other node serves these blocks with the same weights")
        return None
    evidence = None
    if check.verdict != "ok":
        evidence = check.evidence(kind, start, end, positions, inputs, time.time())
        report(swarm, evidence)
    return verifier.decided(check, evidence)


def _unverified(swarm: "RemoteSwarm", start: int, end: int, why: str) -> None:
    if swarm.verifier.first_unverified(start, end):
        log.warning("verification: blocks %d:%d run unverified: %s", start, end, why)


def report(swarm: "RemoteSwarm", evidence: Evidence) -> None:
    """Log the evidence (WARNING) and write it to ``verify_evidence_dir`` if the user chose one."""
    record = evidence.record()
    where = swarm.verifier.params.evidence_dir
    if where is not None:
        try:
            os.makedirs(where, exist_ok=True)
            name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(evidence.time))}-{evidence.input_digest[7:19]}"
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in evidence.tensors.items()}
            save_file(tensors, os.path.join(where, name + ".safetensors"))
            record["tensors"] = name + ".safetensors"
            with open(os.path.join(where, "evidence.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            log.warning("verification: could not write evidence to %s: %s", where, exc)
    if evidence.liar is not None:
        log.warning("verification: %s computed blocks %d:%d wrongly at positions %d:%d (relative error %s, "
                    "tolerance %.2g; arbiter %s agrees with replica %s); avoiding it from now on: %s",
                    evidence.liar, evidence.start, evidence.end, *evidence.positions, record["errors"],
                    evidence.tolerance, evidence.arbiter, evidence.replica if evidence.liar == evidence.accused
                    else evidence.accused, json.dumps(record, sort_keys=True))
    else:
        log.warning("verification: %s and %s disagree on blocks %d:%d at positions %d:%d (relative error %s, "
                    "tolerance %.2g) and no arbiter decided; nobody is avoided: %s", evidence.accused,
                    evidence.replica, evidence.start, evidence.end, *evidence.positions, record["errors"],
                    evidence.tolerance, json.dumps(record, sort_keys=True))
