"""Conformance check of ``KeepAlive`` (spec/messages.md §5.9.1, revision 5).

A node that says it accepts ``KeepAlive`` (``SessionOpened.keepalive``, ``NodeInfo.keepalive``) is
checked on a real session: kept alive every ``idle_timeout / 3`` seconds, the session stays open
past twice its idle timeout, nothing is sent for a keepalive, and the next ``Step`` continues the
cache; a ``KeepAlive`` naming the session on another client's session stream is ``UNKNOWN_SESSION``
and reaches nobody. A node that does not say so is not applicable (revision 4 or older).
"""

from __future__ import annotations

import asyncio

from biopetals.conformance.checks_node import M, Session, _quiet, expect_error, require_capability
from biopetals.conformance.registry import Failed, NotApplicable, check
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import KeepAlive

__all__: list[str] = []


@check("node.session.keepalive", M + "§5.9.1, §5.10, §5.2, §4.2",
       "a node that says keepalive: KeepAlive every idle_timeout/3 keeps a session open past 2 x idle_timeout, "
       "with no reply, and the next Step continues it; KeepAlive on another session's stream is UNKNOWN_SESSION",
       timeout=60.0)
async def session_keepalive(ctx):
    info = await ctx.node_info()
    s = await Session.opened_ok(ctx, max_length=8)
    insider = other = None
    try:
        require_capability(s, info, "keepalive", "4 or older")
        idle = s.opened.idle_timeout
        if idle > ctx.max_idle_wait:
            raise NotApplicable(f"idle_timeout {idle:g} s is over --max-idle-wait {ctx.max_idle_wait:g} s")
        await s.good_step(1)
        # another client names this session on its own session stream: UNKNOWN_SESSION, nothing reaches the owner
        insider = await ctx.new_host()
        other = await Session.opened_ok(ctx, host=insider, max_length=8)
        reply, raw, sent = await other.exchange(KeepAlive(session_id=s.sid))
        expect_error(reply, ErrorCode.UNKNOWN_SESSION, sent=sent, raw=raw)
        # kept alive for twice the idle timeout: nothing arrives (no reply, no TIMEOUT)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() - t0 < 2 * idle:
            sent = await s.send(KeepAlive(session_id=s.sid))
            got = await _quiet(s, idle / 3)
            if got is not None:
                raise Failed(f"after {loop.time() - t0:.1f} s of KeepAlive every {idle / 3:g} s (idle_timeout "
                             f"{idle:g} s) the node sent something", sent=sent, received=got)
        await s.good_step(1, f"a Step after {loop.time() - t0:.1f} s kept alive (idle_timeout {idle:g} s)")
        return f"kept open {loop.time() - t0:.1f} s by KeepAlive (idle_timeout {idle:g} s)"
    finally:
        await s.close()
        if other is not None:
            await other.close()
        if insider is not None:
            await ctx.close_host(insider)
