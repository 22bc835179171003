"""Reads and writes the start-up throughput cache file (the rules are node/throughput_cache.py).

Reading never fails a start: a missing file is a miss; an unreadable, corrupt or foreign one
is logged as a warning and is a miss. Writing is atomic (a temporary file in the same
directory, then ``os.replace``), so a reader sees the old file or the new one, never half of
one. The read-merge-write runs under an exclusive ``flock`` of a sibling ``.lock`` file, so
two nodes that finish measuring at once both keep their entry; the measurement itself runs
outside the lock (Petals holds its lock while it measures, which makes nodes started together
on one machine measure one after the other; here each measures while the other does, the
contention they will see when both serve). Without ``fcntl`` (not POSIX) the last writer wins:
at worst an entry is lost and measured again at the next start. A failed write is a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from biopetals.node.throughput_cache import MAX_FILE_BYTES, MeasureFacts, Throughput, lookup, merge, parse_cache

try:
    import fcntl
except ImportError:  # not POSIX: last writer wins (see above)
    fcntl = None

__all__ = ["read_cached", "write_cached"]

log = logging.getLogger("biopetals.node.throughput")


def _entries(path: Path) -> dict[str, dict]:
    """The valid entries of the file at ``path``; problems are logged, never raised."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("throughput cache %s not read (%s): measuring", path, exc)
        return {}
    parsed = parse_cache(data)
    for problem in parsed.problems:
        log.warning("throughput cache %s: %s; ignored", path, problem)
    return parsed.entries


def read_cached(path: Path, facts: MeasureFacts) -> Throughput | None:
    """The throughput cached at ``path`` for ``facts``, or None."""
    return lookup(_entries(path), facts.key())


@contextmanager
def _locked(path: Path):
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def write_cached(path: Path, facts: MeasureFacts, throughput: Throughput, now: float) -> bool:
    """Store ``throughput`` for ``facts`` at ``path``, keeping the other entries; False (and a
    warning) if it could not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            data = merge(_entries(path), facts, throughput, now)
            fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except OSError as exc:
        log.warning("throughput cache %s not written (%s)", path, exc)
        return False
    return True
