"""Runs checks one by one, each under its own deadline; nothing a peer does stops the run.

Every outcome is a ``Result``: pass, fail (with what was sent and received) or not
applicable. A timeout, a disconnect, garbage that does not decode or any other exception
inside a check is a failure of that check only (spec: the tool must never crash on a
misbehaving peer).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field

from biopetals.conformance.registry import Check, Failed, NotApplicable

__all__ = ["Result", "run_checks"]

PASS, FAIL, NA = "pass", "fail", "n/a"


@dataclass
class Result:
    id: str
    spec: str
    level: str
    title: str
    outcome: str
    detail: str = ""
    sent: str = ""
    received: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def _show(value: object, limit: int = 300) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        text = data[:limit // 2].hex()
        return text + (f"... ({len(data)} bytes)" if len(data) > limit // 2 else "")
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


async def run_one(c: Check, ctx, timeout_scale: float = 1.0) -> Result:
    res = Result(c.id, c.spec, c.level, c.title, PASS)
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(c.timeout * timeout_scale):
            note = await c.func(ctx)
        res.detail = note or ""
    except Failed as exc:
        res.outcome, res.detail = FAIL, exc.message
        res.sent, res.received = _show(exc.sent), _show(exc.received)
    except NotApplicable as exc:
        res.outcome, res.detail = NA, str(exc)
    except TimeoutError:
        res.outcome, res.detail = FAIL, f"no answer within {c.timeout * timeout_scale:g} s"
        res.sent = _show(getattr(ctx, "last_sent", None))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any failure of the peer (reset, disconnect, garbage) fails this check only
        res.outcome = FAIL
        res.detail = f"{type(exc).__name__}: {exc}"
        res.sent = _show(getattr(ctx, "last_sent", None))
        if ctx.verbose:
            res.extra["traceback"] = traceback.format_exc()
    res.seconds = round(time.monotonic() - t0, 3)
    ctx.last_sent = None
    return res


async def run_checks(checks: list[Check], ctx, *, on_result=None, timeout_scale: float = 1.0) -> list[Result]:
    """Every check in order; ``concurrent`` ones start first and run alongside. Results in ``checks`` order."""
    results: dict[str, Result] = {}

    def done(r: Result) -> None:
        results[r.id] = r
        if on_result:
            on_result(r)

    async def background(c: Check) -> None:
        done(await run_one(c, _Detached(ctx), timeout_scale))

    try:
        async with asyncio.TaskGroup() as tg:
            for c in checks:
                if c.concurrent:
                    tg.create_task(background(c))
            for c in checks:
                if not c.concurrent:
                    done(await run_one(c, ctx, timeout_scale))
    finally:
        await ctx.aclose()
    return [results[c.id] for c in checks]


class _Detached:
    """The context for a concurrent check: its own ``last_sent``, everything else shared."""

    def __init__(self, ctx) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "last_sent", None)

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        if name == "last_sent":
            object.__setattr__(self, name, value)
        else:
            setattr(self._ctx, name, value)
