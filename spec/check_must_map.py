#!/usr/bin/env python3
"""Checks that every MUST of spec/*.md is mapped to what tests it (spec/README.md §5.2, §conformance).

    python spec/check_must_map.py            # report; exit 1 if a MUST is unmapped or a reference is broken
    python spec/check_must_map.py --write    # rewrite spec/conformance-map.md: new MUSTs added unmapped, gone ones dropped

A requirement is a sentence (or table row, or list item) of spec/*.md containing the word
MUST. Its id is ``<document>§<section>-<6 hex digits of SHA-256 of the sentence>``, so an
inserted requirement does not renumber the others and an edited one must be mapped again.
``spec/conformance-map.md`` has one table row per id; its last column lists what covers it,
separated by ``;``:

- ``check:<id>`` a check of biopetals-conformance (``biopetals-conformance --list``);
- ``vector:<file>`` every vector of spec/vectors/<file>, or ``vector:<file>#<name>`` one of them;
- ``test:tests/<file>.py::<test name>`` a test function;
- ``fuzz:<target>`` a fuzz target of fuzz/ (``python fuzz/run.py --list``);
- ``none: <why>`` a MUST no peer or test can observe (e.g. a rule for the spec's own editors), said so.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

SPEC = Path(__file__).resolve().parent
ROOT = SPEC.parent
MAP = SPEC / "conformance-map.md"
DOCS = ("README.md", "transport.md", "tensors.md", "messages.md", "dht.md", "announcement.md", "weights.md")
BOILERPLATE = re.compile(r"key words MUST")
HEADING = re.compile(r"^#{2,4}\s+(?:(\d+(?:\.\d+)*)\.?\s+)?(.*)")
SENTENCE_END = re.compile(r"(?<=[.;])\s+(?=[A-Z`(])")


def _blocks(text: str):
    """(section, block text): paragraphs, list items and table rows, outside code fences."""
    section, fence, block = "0", False, []
    for line in text.splitlines() + [""]:
        if line.startswith("```"):
            fence = not fence
            continue
        if fence:
            continue
        m = HEADING.match(line)
        starts_item = bool(re.match(r"^\s*(?:[-*]|\d+\.|[a-z]\.)\s", line)) and not line.startswith("    ")
        if m or not line.strip() or line.lstrip().startswith("|") or starts_item:
            if block:
                yield section, " ".join(block)
                block = []
        if m:
            section = m.group(1) or m.group(2).split()[0].lower()
            continue
        if line.lstrip().startswith("|"):
            yield section, line.strip()
        elif line.strip():
            block.append(line.strip())


def requirements() -> list[dict]:
    """Every MUST sentence of the spec, in document order, with its id."""
    out = []
    for doc in DOCS:
        for section, block in _blocks((SPEC / doc).read_text()):
            for sentence in SENTENCE_END.split(block):
                if re.search(r"\bMUST\b", sentence) and not BOILERPLATE.search(sentence):
                    norm = " ".join(sentence.split())
                    digest = hashlib.sha256(norm.encode()).hexdigest()[:6]
                    out.append({"id": f"{doc.removesuffix('.md')}§{section}-{digest}", "text": norm})
    seen = set()
    for r in out:  # the same sentence twice in one section: number the repeats
        base, n = r["id"], 2
        while r["id"] in seen:
            r["id"], n = f"{base}.{n}", n + 1
        seen.add(r["id"])
    return out


def read_map() -> dict[str, list[str]]:
    mapped = {}
    if MAP.exists():
        for line in MAP.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and "§" in cells[0] and not cells[0].startswith("-"):
                refs = [c.strip() for c in cells[-1].split(";") if c.strip()]
                for i, ref in enumerate(refs):  # a "none:" reason runs to the end of the cell
                    if ref.startswith("none:"):
                        refs[i:] = ["; ".join(refs[i:])]
                        break
                mapped[cells[0]] = refs
    return mapped


def _check_ids() -> set[str] | None:
    try:
        from biopetals.conformance.catalog import checks_for
    except ImportError:
        return None
    return {c.id for c in checks_for("all")}


def broken_reference(ref: str, checks: set[str] | None) -> str | None:
    kind, _, what = ref.partition(":")
    if kind == "check":
        if checks is not None and what not in checks:
            return f"no conformance check {what!r}"
    elif kind == "vector":
        file, _, name = what.partition("#")
        path = SPEC / "vectors" / file
        if not path.exists():
            return f"no vector file {file}"
        if name:
            doc = json.loads(path.read_text())
            names = {v.get("name") for group in doc.values() if isinstance(group, list) for v in group if isinstance(v, dict)}
            if name not in names:
                return f"no vector {name!r} in {file}"
    elif kind == "test":
        file, _, func = what.partition("::")
        path = ROOT / file
        if not path.exists() or not re.search(rf"^\s*(?:async )?def {re.escape(func)}\(", path.read_text(), re.M):
            return f"no test {what}"
    elif kind == "fuzz":
        if not any(f'"{what}"' in p.read_text() or f"'{what}'" in p.read_text() or f"def {what}(" in p.read_text() for p in (ROOT / "fuzz").glob("*.py")):
            return f"no fuzz target {what!r}"
    elif kind != "none":
        return f"unknown kind of reference {ref!r}"
    return None


def report() -> tuple[int, list[str]]:
    reqs = requirements()
    mapped = read_map()
    checks = _check_ids()
    problems = []
    unmapped = [r for r in reqs if not mapped.get(r["id"])]
    for r in unmapped:
        problems.append(f"unmapped: {r['id']}: {r['text'][:100]}")
    ids = {r["id"] for r in reqs}
    for key in mapped:
        if key not in ids:
            problems.append(f"stale: {key} is in the map but no longer a MUST of spec/ (run --write)")
    for key, refs in mapped.items():
        for ref in refs:
            why = broken_reference(ref, checks)
            if why:
                problems.append(f"broken reference in {key}: {why}")
    unobservable = sum(1 for r in reqs if any(x.startswith("none:") for x in mapped.get(r["id"], [])))
    summary = (f"{len(reqs)} MUSTs, {len(reqs) - len(unmapped)} mapped ({unobservable} of them marked 'none:' with a reason), "
               f"{len(unmapped)} unmapped")
    return len(unmapped), [summary, *problems]


def write() -> None:
    mapped = read_map()
    rows = ["| id | requirement | covered by |", "|---|---|---|"]
    for r in requirements():
        text = r["text"].replace("|", "\\|")
        rows.append(f"| {r['id']} | {text} | {'; '.join(mapped.get(r['id'], []))} |")
    head = MAP.read_text().split("| id | requirement |")[0] if MAP.exists() else "# MUST map\n\n"
    MAP.write_text(head + "\n".join(rows) + "\n")


def main(argv: list[str]) -> int:
    if "--write" in argv:
        write()
    unmapped, lines = report()
    print("\n".join(lines))
    return 1 if len(lines) > 1 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
