"""Stateless forward and backward through the remote blocks, as a torch autograd function.

``remote_blocks(swarm, hidden, mask, prompts)`` runs ``hidden`` ``[batch, tokens, hidden]``
through blocks ``[0, N)`` with ``Forward`` calls along a route (spec/messages.md
§6.1) and remembers each span's input. Its backward sends ``Backward`` calls in
reverse order (§6.2): each node recomputes its span's forward pass and returns
the gradient w.r.t. its inputs, so gradients reach client-side parameters
(embeddings, prompts, adapters before the blocks) while the nodes' weights stay
frozen. Deep prompts ``[N, batch, prefix, hidden]`` (§8: ``prompts[i]`` is added
to the first ``prefix`` positions before block ``i``) are cut per span, and their
gradients (``grad_prompts``) are put back together for the whole model. ``mask`` (``[batch, tokens]``, 1 = token, 0 = padding) travels with every
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


def _span_prompts(prompts: torch.Tensor | None, r: RouteSpan) -> torch.Tensor | None:
    return None if prompts is None else prompts[r.start:r.end].contiguous()


async def forward_all(swarm: "RemoteSwarm", hidden: torch.Tensor, mask: torch.Tensor | None = None,
                      prompts: torch.Tensor | None = None
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
                out = await swarm.forward(r, x, cfg.codec, mask, _span_prompts(prompts, r))
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
                       grad: torch.Tensor, mask: torch.Tensor | None = None, prompts: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients w.r.t. the first span's input and the prompts, given d loss / d outputs of the last block."""
    cfg = swarm.config
    failures: list[PeerFailure] = []
    grad_prompts = None if prompts is None else torch.zeros_like(prompts)
    for r, x in reversed(trace):
        route = [r]
        while True:
            try:
                grad = (await _backward_chain(swarm, route, x, grad, mask, prompts, grad_prompts)).to(x.dtype)
                break
            except PeerFailure as failure:
                failures.append(failure)
                swarm.failed(failure)
                if len(failures) > cfg.max_failovers:
                    raise SwarmError(f"backward through blocks {r.start}:{r.end} failed {len(failures)} times.",
                                     failures) from failure
                route = await swarm.find_route(r.start, r.end, forward=True, force=True)
    return grad, grad_prompts


async def _backward_chain(swarm: "RemoteSwarm", route: list[RouteSpan], x: torch.Tensor, g: torch.Tensor,
                          mask: torch.Tensor | None, prompts: torch.Tensor | None,
                          grad_prompts: torch.Tensor | None) -> torch.Tensor:
    """Backward through ``route`` from input ``x``; a route of several spans (a re-routed span
    split over nodes) first runs forward to get each part's input. Prompt gradients are
    written into ``grad_prompts`` at each part's blocks (only once the whole chain succeeded,
    so a retried chain never adds twice)."""
    codec = swarm.config.codec
    inputs = [x]
    for r in route[:-1]:
        inputs.append((await swarm.forward(r, inputs[-1], codec, mask, _span_prompts(prompts, r))).to(x.dtype))
    parts = []
    for r, inp in zip(reversed(route), reversed(inputs)):
        g, gp = await swarm.backward(r, inp, g, codec, mask, _span_prompts(prompts, r))
        g = g.to(x.dtype)
        parts.append((r, gp))
    if grad_prompts is not None:
        for r, gp in parts:
            grad_prompts[r.start:r.end] = gp.to(grad_prompts.dtype)
    return g


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
    if mask is not None:
        mask = mask.detach().to(device="cpu", dtype=torch.bool)
        if bool(mask.all()):
            mask = None  # no padding: the same as no mask (spec/messages.md §8.1)
    if prompts is not None:
        n, batch, tokens = swarm.n_blocks, hidden.shape[0], hidden.shape[1]
        if prompts.ndim != 4 or prompts.shape[0] != n or prompts.shape[1] != batch or prompts.shape[3] != hidden.shape[2]:
            raise ValueError(f"prompts must be [{n}, {batch}, P, {hidden.shape[2]}], got {list(prompts.shape)}")
        if not 0 < prompts.shape[2] <= tokens:
            raise ValueError(f"{prompts.shape[2]} prompt positions for {tokens} tokens")
    return _RemoteBlocks.apply(hidden, prompts, swarm, mask)
