"""Output: a plain-text table (one row per check, details under each failure) or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict

from biopetals.conformance.runner import FAIL, NA, PASS, Result

__all__ = ["table", "to_json", "summary", "exit_status"]


def summary(results: list[Result]) -> dict[str, int]:
    return {k: sum(r.outcome == k for r in results) for k in (PASS, FAIL, NA)}


def exit_status(results: list[Result]) -> int:
    """0 when every MUST and SHOULD check passed or was not applicable, 1 otherwise."""
    return 1 if any(r.outcome == FAIL for r in results) else 0


def row(r: Result) -> str:
    mark = {PASS: "pass", FAIL: "FAIL", NA: "n/a "}[r.outcome]
    line = f"{mark}  {r.level:<6} {r.id:<48} {r.spec:<32} {r.title}"
    if r.outcome != PASS and r.detail:
        line += f"\n        {'why' if r.outcome == FAIL else 'note'}: {r.detail}"
    if r.outcome == FAIL:
        if r.sent:
            line += f"\n        sent: {r.sent}"
        if r.received:
            line += f"\n        received: {r.received}"
    return line


def table(results: list[Result]) -> str:
    head = f"{'':4}  {'level':<6} {'check':<48} {'spec':<32} title"
    s = summary(results)
    foot = f"\n{s[PASS]} passed, {s[FAIL]} failed, {s[NA]} not applicable ({len(results)} checks)"
    return "\n".join([head, *(row(r) for r in results)]) + foot


def to_json(results: list[Result], peer: str) -> str:
    return json.dumps({"peer": peer, "summary": summary(results), "results": [asdict(r) for r in results]}, indent=1)
