"""biopetals-conformance without a peer: its registry, its runner, and what it may import.

The checks themselves run against real peers in tests/test_conformance.py.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_check_names_a_section_that_exists():
    from biopetals.conformance.catalog import checks_for

    checks = checks_for("all")
    assert len({c.id for c in checks}) == len(checks)
    for c in checks:
        m = re.match(r"spec/(\w+\.md) §(\d+(?:\.\d+)*)", c.spec)
        assert m, c
        doc = (ROOT / "spec" / m.group(1)).read_text()
        section = re.escape(m.group(2))  # a heading, or a numbered row of a rules table (dht.md §4)
        assert re.search(rf"^(#+ {section}\.? |\| {section} \|)", doc, re.M), (c.id, c.spec)


def test_the_tool_never_imports_the_implementation_it_tests():
    """conformance/ may use protocol/, transport/ and the DHT's codecs, never node/, client/, models/ or weights/ (it must not trust them)."""
    import ast

    allowed_dht = {"biopetals.dht", "biopetals.dht.messages", "biopetals.dht.records", "biopetals.dht.ids", "biopetals.dht.params"}
    for path in sorted((ROOT / "conformance").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("biopetals.node", "biopetals.client", "biopetals.models", "biopetals.weights")), (path.name, name)
                if name.startswith("biopetals.dht"):
                    assert name in allowed_dht, (path.name, name)


def test_the_runner_turns_any_exception_or_timeout_into_a_failed_check():
    """A check that raises anything, or hangs, fails alone; the run goes on; results keep their order."""
    import asyncio

    from biopetals.conformance.registry import Check, Failed, NotApplicable
    from biopetals.conformance.runner import run_checks

    async def ok(ctx):
        return "fine"

    async def failed(ctx):
        raise Failed("broke a rule", sent=b"\x01\x02", received="reply")

    async def na(ctx):
        raise NotApplicable("not here")

    async def crash(ctx):
        ctx.last_sent = b"\xc1"
        raise KeyError("garbage")

    async def hang(ctx):
        await asyncio.sleep(60)

    class Ctx:
        verbose, last_sent, closed = False, None, False

        async def aclose(self):
            self.closed = True

    funcs = {"ok": ok, "failed": failed, "na": na, "crash": crash, "hang": hang, "slow": hang}
    checks = [Check(f"node.{k}", "node", "spec/messages.md §2.6", "MUST", k, f, timeout=0.2, concurrent=(k == "slow"))
              for k, f in funcs.items()]
    ctx = Ctx()
    results = asyncio.run(run_checks(checks, ctx))
    assert [(r.id, r.outcome) for r in results] == [
        ("node.ok", "pass"), ("node.failed", "fail"), ("node.na", "n/a"), ("node.crash", "fail"),
        ("node.hang", "fail"), ("node.slow", "fail")]
    assert results[0].detail == "fine" and results[1].sent == "0102" and results[1].received == "'reply'"
    assert "KeyError" in results[3].detail and results[3].sent == "c1"
    assert "no answer within 0.2 s" in results[4].detail
    assert ctx.closed
