"""Conformance checks of cache rollback (spec/messages.md §5.6.1, ``Step.truncate``, revision 4).

A node that says it rolls back (``SessionOpened.rollback``, ``NodeInfo.rollback``) is checked on
a real session: a ``truncate`` step computes exactly what a session that never held the cut
columns computes, a ``truncate`` step above the cache is ``BAD_POSITION``, and a duplicate
``truncate`` step is not run and cuts nothing. A node that does not say so is not applicable
(revision 3); it must still refuse a step below its cache (``node.step.position-overlap``).
"""

from __future__ import annotations

import torch

from biopetals.conformance.checks_node import M, Session, _quiet, expect_error, require_capability
from biopetals.conformance.registry import Failed, check
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import StepResult

__all__: list[str] = []

TOLERANCE = 1e-3  # f32 on the wire; the same computation, so only rounding of another batch shape differs


def _columns(info, tokens: int, seed: int) -> torch.Tensor:
    """Distinct activations per column, small enough for any model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, info.hidden_size, generator=g) * 0.1


async def _result(s: Session, message, what: str) -> torch.Tensor:
    reply, raw, sent = await s.exchange(message)
    if not isinstance(reply, StepResult) or reply.step_id != message.step_id:
        raise Failed(f"{what} was not answered by its StepResult", sent=sent, received=reply)
    return reply.hidden


@check("node.step.rollback", M + "§5.6.1, §5.2, §4.2",
       "a node that says rollback: a truncate step equals a session that never held the cut columns; "
       "truncate above the cache is BAD_POSITION; a duplicate truncate step cuts nothing", timeout=40.0)
async def step_rollback(ctx):
    info = await ctx.node_info()
    s = await Session.opened_ok(ctx, max_length=8)
    fresh = None
    try:
        require_capability(s, info, "rollback", "3 or older")
        first, second = _columns(info, 4, 1), _columns(info, 2, 2)
        await _result(s, s.step(hidden=first), "a Step of 4 columns")
        # truncate above the cache: BAD_POSITION, nothing changes
        above = s.step(step_id=1, position=5, hidden=second, truncate=1)
        reply, raw, sent = await s.exchange(above)
        expect_error(reply, ErrorCode.BAD_POSITION, sent=sent, step_id=1, raw=raw)
        # roll back to 1 column, then 2 new ones
        rolled = await _result(s, s.step(step_id=2, position=1, hidden=second, truncate=1), "a truncate Step")
        # the same as a session that held only the kept column
        fresh = await Session.opened_ok(ctx, max_length=8)
        await _result(fresh, fresh.step(hidden=first[:, :1]), "a Step of 1 column")
        want = await _result(fresh, fresh.step(step_id=1, position=1, hidden=second), "a Step of 2 columns")
        diff = (rolled - want).abs().max().item()
        if not diff <= TOLERANCE:
            raise Failed(f"a truncate Step's outputs differ by {diff:g} from a session that never held the cut "
                         "columns (§5.6.1)")
        # a duplicate truncate step (an old id) is not run and cuts nothing (§5.6.1, §5.7)
        dup = s.step(step_id=2, position=0, hidden=second, truncate=1)
        await s.send(dup)
        got = await _quiet(s)
        if got is not None:
            raise Failed("a duplicate truncate Step was answered", sent=dup, received=got)
        after = await _result(s, s.step(step_id=3, position=3, hidden=first[:, :1]), "the Step after a duplicate")
        again = await _result(fresh, fresh.step(step_id=2, position=3, hidden=first[:, :1]), "the same Step")
        if not (after - again).abs().max().item() <= TOLERANCE:
            raise Failed("after a duplicate truncate Step the cache differs: the duplicate cut it (§5.6.1)")
    finally:
        await s.close()
        if fresh is not None:
            await fresh.close()
