"""Where the spec's vectors are: ``--vectors DIR``, else the spec/vectors of this source tree."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import msgpack

__all__ = ["vectors_dir", "load", "load_or_stub", "slug", "spec_of"]


def vectors_dir() -> Path:
    env = os.environ.get("BIOPETALS_SPEC_VECTORS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "spec" / "vectors"


def load(name: str) -> dict | None:
    path = vectors_dir() / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


_SLUGS: set[tuple[str, str]] = set()


def slug(name: str, scope: str = "") -> str:
    """A vector's name as part of a check id (unique within ``scope``: a repeat gets -2, -3, ...)."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]
    text, n = base, 2
    while (scope, text) in _SLUGS:
        text, n = f"{base}-{n}", n + 1
    _SLUGS.add((scope, text))
    return text


def load_or_stub(name: str, check, check_id: str, spec: str) -> dict | None:
    """The vector file, or None after registering one not-applicable check saying it is missing."""
    doc = load(name)
    if doc is None:
        from biopetals.conformance.registry import NotApplicable

        async def missing(ctx):
            raise NotApplicable(f"spec/vectors/{name} not found (set BIOPETALS_SPEC_VECTORS)")

        check(check_id, spec, f"the invalid vectors of spec/vectors/{name}")(missing)
    return doc


def spec_of(rule: str, doc: str) -> str:
    """A vector's ``rule`` ("§5.3 rule 2", "spec/tensors.md §3.3: ...") as a check's spec reference."""
    first = rule.split(",")[0].split(":")[0].strip()
    return first if first.startswith("spec/") else doc + first


def envelope_type(data: bytes) -> int | None:
    """The envelope's type if the bytes parse leniently as a map with an int key 1, else None
    (which type a vector claims to be, whatever is wrong with it)."""
    try:
        obj = msgpack.unpackb(data, strict_map_key=False, raw=True)
    except Exception:
        return None
    value = obj.get(1) if isinstance(obj, dict) else None
    return value if type(value) is int else None
