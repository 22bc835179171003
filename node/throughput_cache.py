"""The start-up throughput cache's rules, sans-IO: its key, lookup, merge and the validation of its file.

A node measures its span's throughput before it first announces it (node/benchmark.py,
spec/messages.md §4.2 ``inference_tps``/``forward_tps``): ~3 CPU s for 4 blocks of a 1B-shape
Llama on this project's 2-core machine, on every start. Like Petals (its server/throughput.py
keeps a JSON file under its cache directory), a node keeps the numbers in a file and a later
start with the same facts reads them instead of measuring (issue 23 item 5).

The key is a hash of everything that changes the numbers (``MeasureFacts``): the architecture
(models/config.py ``config_fingerprint``, the config's fields, not the model's name), the
served block count, compute dtype, quantisation, attention implementation, device type and
name, the CPU count, torch's version and intra-op thread count, and the measurement's own
parameters. The file is read as untrusted input: anything that is not this format's version
with finite positive numbers is ignored with a warning (``parse_cache`` returns the problems,
the caller logs them) and never trusted; one bad entry costs only itself.

No I/O here: node/throughput_store.py reads and writes the file, ``now`` is an argument.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "FORMAT", "VERSION", "MAX_ENTRIES", "MAX_FILE_BYTES", "MeasureFacts", "Throughput", "Parsed",
    "parse_cache", "lookup", "merge", "default_cache_path", "cache_path_option",
]

FORMAT = "biopetals-throughput-cache"
VERSION = 1
MAX_ENTRIES = 256  # entries kept; a merge drops the oldest beyond (a machine rarely holds more than a few)
MAX_FILE_BYTES = 1 << 20  # a larger file is not read (256 entries take ~150 KB)
MAX_TPS = 1e12  # tokens/s above this are not a measurement
_KEY_CHARS = frozenset("0123456789abcdef")
_KEY_LEN = 64


@dataclass(frozen=True)
class MeasureFacts:
    """Everything that changes a span's measured throughput; equal facts, equal key."""

    config: str  # models.config.config_fingerprint: the architecture, not the name
    blocks: int
    max_length: int  # bounds the decode steps measured
    dtype: str
    quant: str
    attention: str  # the config's attention implementation (sdpa, eager, ...)
    device_type: str
    device_name: str
    cpu_count: int
    torch_version: str
    threads: int  # torch intra-op threads of the measuring thread
    method: str  # the measurement's parameters (node/benchmark.py METHOD)

    def key(self) -> str:
        """SHA-256 (hex) of the facts as canonical JSON."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


class Throughput(NamedTuple):
    """Tokens/s of the whole span: single-sequence decode (inference) and a stateless forward."""

    inference_tps: float
    forward_tps: float


class Parsed(NamedTuple):
    """The valid entries of a cache file (key -> entry as stored) and what was wrong with it."""

    entries: dict[str, dict]
    problems: list[str]


def _is_tps(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 < value <= MAX_TPS)


def _entry_problem(key: object, entry: object) -> str | None:
    """Why ``key: entry`` is not a valid entry, or None."""
    if not isinstance(key, str) or len(key) != _KEY_LEN or not _KEY_CHARS.issuperset(key):
        return "a key that is not a SHA-256 hex digest"
    if not isinstance(entry, dict):
        return f"entry {key[:12]}: not an object"
    for name in ("inference_tps", "forward_tps"):
        if not _is_tps(entry.get(name)):
            return f"entry {key[:12]}: {name} is not a finite positive number"
    at = entry.get("measured_at")
    if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at):
        return f"entry {key[:12]}: measured_at is not a finite number"
    return None


def parse_cache(data: bytes) -> Parsed:
    """The valid entries of a cache file's bytes; a bad or foreign file gives none, a bad entry is skipped."""
    if len(data) > MAX_FILE_BYTES:
        return Parsed({}, [f"larger than {MAX_FILE_BYTES} bytes"])
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return Parsed({}, [f"not JSON ({type(exc).__name__})"])
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return Parsed({}, [f"not a {FORMAT} file"])
    if doc.get("version") != VERSION:
        return Parsed({}, [f"version {doc.get('version')!r}, this node reads version {VERSION}"])
    raw = doc.get("entries")
    if not isinstance(raw, dict):
        return Parsed({}, ["entries is not an object"])
    entries, problems = {}, []
    for key, entry in raw.items():
        problem = _entry_problem(key, entry)
        if problem is None:
            entries[key] = entry
        else:
            problems.append(problem)
    return Parsed(entries, problems)


def lookup(entries: Mapping[str, dict], key: str) -> Throughput | None:
    """The cached throughput under ``key`` (entries as ``parse_cache`` returns them), or None."""
    entry = entries.get(key)
    if entry is None:
        return None
    return Throughput(float(entry["inference_tps"]), float(entry["forward_tps"]))


def merge(entries: Mapping[str, dict], facts: MeasureFacts, throughput: Throughput, now: float) -> bytes:
    """The file's new bytes: ``entries`` with ``facts``' entry set to ``throughput`` measured at ``now``;
    beyond ``MAX_ENTRIES``, the oldest measurements are dropped."""
    if not (_is_tps(throughput.inference_tps) and _is_tps(throughput.forward_tps)):
        raise ValueError(f"not a throughput to cache: {throughput}")
    merged = dict(entries)
    merged[facts.key()] = {"inference_tps": float(throughput.inference_tps),
                           "forward_tps": float(throughput.forward_tps),
                           "measured_at": float(now), "facts": asdict(facts)}
    if len(merged) > MAX_ENTRIES:
        newest = sorted(merged, key=lambda k: merged[k]["measured_at"], reverse=True)[:MAX_ENTRIES]
        merged = {k: merged[k] for k in newest}
    doc = {"format": FORMAT, "version": VERSION, "entries": merged}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def default_cache_path(environ: Mapping[str, str] = os.environ, home: Path | None = None) -> Path:
    """``$BIOPETALS_CACHE/throughput.json``, BIOPETALS_CACHE defaulting to ``~/.cache/biopetals``: where
    the node's other cached files go (weights/fetch.py, models/smollm2.py)."""
    root = environ.get("BIOPETALS_CACHE")
    base = Path(root).expanduser() if root else (home if home is not None else Path.home()) / ".cache" / "biopetals"
    return base / "throughput.json"


def cache_path_option(value: str | None, environ: Mapping[str, str] = os.environ) -> Path | None:
    """``--throughput-cache``: None (the option left out) is the default path, ``none`` no cache."""
    if value is None:
        return default_cache_path(environ)
    if value.strip().lower() == "none":
        return None
    if not value.strip():
        raise ValueError("--throughput-cache: an empty path (use 'none' for no cache)")
    return Path(value).expanduser()
