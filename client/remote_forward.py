"""Stateless forward and backward through the remote blocks, as a torch autograd function.

``remote_blocks(swarm, hidden, mask, prompts)`` runs ``hidden`` ``[batch, tokens, hidden]``
through blocks ``[0, N)`` with ``Forward`` calls along a route (spec/messages.md
§6.1) and remembers each span's input. Its backward sends ``Backward`` calls in
reverse order (§6.2): each node recomputes its span's forward pass and returns
the gradient w.r.t. its inputs, so gradients reach client-side parameters
(embeddings, prompts, adapters before the blocks) while the nodes' weights stay
frozen. Deep prompts ``[N, batch, prefix, hidden]`` (§8: ``prompts[i]`` is added
to the first ``prefix`` positions before block ``i``) are cut per span, and their
gradients (``grad_prompts``) are put back together for the whole model. ``mask``
(``[batch, tokens]``, 1 = token, 0 = padding) travels with every call (§8.1), so a
padded batch is one call per span, or one per group of sequences when the batch is
over one message's limits (client/chunking.py, spec/tensors.md §2).

The rules (which calls, re-routing around a failed node, the failover budget) are the
chain state's (client/chain.py, ``CallChain``); this module is its asyncio driver.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

from biopetals.protocol.errors import ErrorCode

from .chain import Avoid, CallBackward, CallChain, CallForward, Finished, Route, checked_extras
from .errors import PeerFailure
from .routing import MissingBlocksError, RouteSpan
from .verifying import check_backward, check_forward

if TYPE_CHECKING:
    from .swarm import RemoteSwarm

__all__ = ["remote_blocks", "forward_all", "backward_all"]

log = logging.getLogger("biopetals.client.verify")

MAX_REVERIFIED = 3  # passes run while liars are found on their route; the last one's result is taken as it is


async def forward_all(swarm: "RemoteSwarm", hidden: torch.Tensor, mask: torch.Tensor | None = None,
                      prompts: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[tuple[RouteSpan, torch.Tensor]]]:
    """Outputs of the last block, and ``(span, input)`` for every span used."""
    for _ in range(MAX_REVERIFIED):
        chain = _chain(swarm)
        chain.forward(hidden, mask, prompts, time.monotonic())
        out, trace = await _drive(swarm, chain)
        # verified computation (client/verifying.py): a node of the route proven to lie is never routed
        # again; rerun the pass
        if not swarm.verifier.enabled or not (await check_forward(swarm, trace, out, mask, prompts)
                                              & {r.peer_id for r, _ in trace}):
            break
    else:
        log.warning("verification: still finding liars after %d forward passes; the last is unverified",
                    MAX_REVERIFIED)
    return out, trace


async def backward_all(swarm: "RemoteSwarm", trace: list[tuple[RouteSpan, torch.Tensor]],
                       grad: torch.Tensor, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the first span's input and the prompts, given d loss / d outputs of the last block."""
    for _ in range(MAX_REVERIFIED):
        chain = _chain(swarm)
        chain.backward(trace, grad, mask, prompts, time.monotonic())
        result = await _drive(swarm, chain)
        # verified computation: a liar of the route is never called again (``_drive``), the pass is rerun
        records = chain.backward_records
        if not swarm.verifier.enabled or not (await check_backward(swarm, records, mask, prompts)
                                              & {r.peer_id for r, *_ in records}):
            break
    else:
        log.warning("verification: still finding liars after %d backward passes; the last is unverified",
                    MAX_REVERIFIED)
    return result


def _chain(swarm: "RemoteSwarm") -> CallChain:
    cfg = swarm.config
    return CallChain(swarm.n_blocks, timeout=cfg.forward_timeout, max_failovers=cfg.max_failovers,
                     chunking=cfg.chunking(), hidden_size=swarm.hidden_size,
                     max_positions=swarm.max_positions)


async def _drive(swarm: "RemoteSwarm", chain: CallChain):
    """Do what the state says until it finishes; returns its value."""
    codec = swarm.config.codec
    while True:
        action = chain.action
        if isinstance(action, Finished):
            return action.value
        if isinstance(action, Route):
            try:
                route = await swarm.find_route(action.start, action.end, forward=True, force=action.force)
            except MissingBlocksError as exc:
                chain.no_route(exc, time.monotonic())
            else:
                chain.routed(route, time.monotonic())
        elif isinstance(action, (CallForward, CallBackward)) and swarm.verifier.is_liar(action.span.peer_id):
            # a node proven to compute wrongly (client/verification.py), e.g. in a forward pass's trace
            chain.failed(PeerFailure(action.span.peer_id, "proven to compute wrongly (verified computation)",
                                     int(ErrorCode.INVALID_TENSOR)), time.monotonic())
        elif isinstance(action, (CallForward, CallBackward)):
            try:
                async with asyncio.timeout(action.deadline - time.monotonic()):
                    if isinstance(action, CallForward):
                        value = await swarm.forward(action.span, action.hidden, codec, action.mask, action.prompts)
                    else:
                        value = await swarm.backward(action.span, action.hidden, action.grad, codec, action.mask,
                                                     action.prompts)
            except TimeoutError:
                chain.handle_timer(max(time.monotonic(), action.deadline))
            except PeerFailure as failure:
                chain.failed(failure, time.monotonic())
            else:
                chain.returned(value, time.monotonic())
        elif isinstance(action, Avoid):
            swarm.failed(action.failure)
            chain.done(time.monotonic())
        else:
            raise RuntimeError(f"unexpected action {action!r}")


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, prompts: torch.Tensor | None, swarm: "RemoteSwarm",  # type: ignore[override]
                mask: torch.Tensor | None) -> torch.Tensor:
        prompts = None if prompts is None else prompts.detach().to(hidden.dtype).contiguous()
        out, trace = swarm.loop.run(forward_all(swarm, hidden.detach(), mask, prompts))
        ctx.swarm = swarm
        ctx.trace = trace
        ctx.mask = mask
        ctx.prompts = prompts
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad, grad_prompts = ctx.swarm.loop.run(
            backward_all(ctx.swarm, ctx.trace, grad_output.detach().contiguous(), ctx.mask, ctx.prompts))
        return grad.to(grad_output.dtype), grad_prompts, None, None


def remote_blocks(swarm: "RemoteSwarm", hidden: torch.Tensor, mask: torch.Tensor | None = None,
                  prompts: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden`` through blocks ``[0, N)``, differentiable w.r.t. ``hidden`` and ``prompts``.

    ``mask``: padding (1 = token). ``prompts``: deep prompts ``[N, batch, prefix, hidden]``
    (spec/messages.md §8), ``prefix <= tokens``.
    """
    mask, _ = checked_extras(swarm.n_blocks, hidden, mask, prompts)  # the prompts as given: autograd tracks them
    return _RemoteBlocks.apply(hidden, prompts, swarm, mask)
