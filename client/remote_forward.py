"""Stateless forward and backward through the remote blocks, as a torch autograd function.

``remote_blocks(swarm, hidden, mask)`` runs ``hidden`` ``[batch, tokens, hidden]``
through blocks ``[0, N)`` with ``Forward`` calls along a route (spec/messages.md
§6.1) and remembers each span's input. Its backward sends ``Backward`` calls in
reverse order (§6.2): each node recomputes its span's forward pass and returns
the gradient w.r.t. its inputs, so gradients reach client-side parameters
(embeddings, prompts, adapters before the blocks) while the nodes' weights stay
frozen. ``mask`` (``[batch, tokens]``, 1 = token, 0 = padding) travels with every
call (§8.1), so a padded batch is one call per span.

A failing node is avoided and its span re-routed (possibly over several nodes);
since calls are stateless, the retry is simply the same call elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import PeerFailure, SwarmError
from .routing import RouteSpan

if TYPE_CHECKING:
    from .swarm import RemoteSwarm

__all__ = ["remote_blocks", "forward_all", "backward_all"]


async def forward_all(swarm: "RemoteSwarm", hidden: torch.Tensor, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[tuple[RouteSpan, torch.Tensor]]]:
    """Outputs of the last block, and ``(span, input)`` for every span used."""
    cfg = swarm.config
    failures: list[PeerFailure] = []
    trace: list[tuple[RouteSpan, torch.Tensor]] = []
    x = hidden
    block = 0
    n = swarm.n_blocks
    force = False
    while block < n:
        route = await swarm.find_route(block, n, forward=True, force=force)
        for r in route:
            try:
                out = await swarm.forward(r, x, cfg.codec, mask)
            except PeerFailure as failure:
                failures.append(failure)
                swarm.failed(failure)
                if len(failures) > cfg.max_failovers:
                    raise SwarmError(f"forward through blocks {r.start}:{r.end} failed {len(failures)} times.",
                                     failures) from failure
                force = True
                break  # re-route from this block on
            trace.append((r, x))
            x = out.to(hidden.dtype)
            block = r.end
    return x, trace


async def backward_all(swarm: "RemoteSwarm", trace: list[tuple[RouteSpan, torch.Tensor]],
                       grad: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. the first span's input, given d loss / d outputs of the last block."""
    cfg = swarm.config
    failures: list[PeerFailure] = []
    for r, x in reversed(trace):
        route = [r]
        while True:
            try:
                grad = (await _backward_chain(swarm, route, x, grad, mask)).to(x.dtype)
                break
            except PeerFailure as failure:
                failures.append(failure)
                swarm.failed(failure)
                if len(failures) > cfg.max_failovers:
                    raise SwarmError(f"backward through blocks {r.start}:{r.end} failed {len(failures)} times.",
                                     failures) from failure
                route = await swarm.find_route(r.start, r.end, forward=True, force=True)
    return grad


async def _backward_chain(swarm: "RemoteSwarm", route: list[RouteSpan], x: torch.Tensor, g: torch.Tensor,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """Backward through ``route`` from input ``x``; a route of several spans (a re-routed span
    split over nodes) first runs forward to get each part's input."""
    codec = swarm.config.codec
    inputs = [x]
    for r in route[:-1]:
        inputs.append((await swarm.forward(r, inputs[-1], codec, mask)).to(x.dtype))
    for r, inp in zip(reversed(route), reversed(inputs)):
        g = (await swarm.backward(r, inp, g, codec, mask)).to(x.dtype)
    return g


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, swarm: "RemoteSwarm", mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        out, trace = swarm.loop.run(forward_all(swarm, hidden.detach(), mask))
        ctx.swarm = swarm
        ctx.trace = trace
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad = ctx.swarm.loop.run(backward_all(ctx.swarm, ctx.trace, grad_output.detach().contiguous(), ctx.mask))
        return grad.to(grad_output.dtype), None, None


def remote_blocks(swarm: "RemoteSwarm", hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden`` through blocks ``[0, N)``, differentiable w.r.t. ``hidden``; ``mask``: padding (1 = token)."""
    if mask is not None:
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # no padding: the same as no mask (spec/messages.md §8.1)
    return _RemoteBlocks.apply(hidden, swarm, mask)
