"""Reads and writes the start-up throughput cache file (the rules are node/throughput_cache.py).

Reading never fails a start: a missing file is a miss; an unreadable, corrupt or foreign one
is logged as a warning and is a miss. Writing is atomic (a temporary file in the same
directory, then ``os.replace``), so a reader sees the old file or the new one, never half of one.

``read_or_measure`` measures under an exclusive ``flock`` of a sibling ``.lock`` file, as Petals
does: one node of a machine measures at a time, so a measurement is not slowed by another's
(two nodes of one pipeline compute in turn, not at once), and a node started beside another with
the same facts waits for its result and reads it instead of measuring too. The lock is waited
for at most ``lock_wait`` seconds (a measurement takes a few); then the node measures without it.
Without ``fcntl`` (not POSIX) there is no lock and the last writer wins: at worst an entry is
lost and measured again at the next start. A failed write is a warning.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from biopetals.node.throughput_cache import MAX_FILE_BYTES, MeasureFacts, Throughput, lookup, merge, parse_cache

try:
    import fcntl
except ImportError:  # not POSIX: last writer wins (see above)
    fcntl = None

__all__ = ["read_cached", "write_cached", "read_or_measure", "LOCK_WAIT"]

LOCK_WAIT = 60.0  # s a node waits for another's measurement before measuring without the lock
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
def _locked(path: Path, wait: float) -> Iterator[bool]:
    """Hold the file's lock (True), or give up after ``wait`` s or on an error (False: go on unlocked)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a+b")
    except OSError as exc:
        log.warning("throughput cache %s: no lock (%s)", path, exc)
        yield False
        return
    with lock:  # closing the file releases the lock, as does the process's death
        deadline = time.monotonic() + wait
        held = fcntl is None
        while not held:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("throughput cache %s: still locked after %.0f s; measuring beside", path, wait)
                    break
                time.sleep(0.05)
            except OSError as exc:
                log.warning("throughput cache %s: no lock (%s)", path, exc)
                break
        yield held


def write_cached(path: Path, facts: MeasureFacts, throughput: Throughput, now: float) -> bool:
    """Store ``throughput`` for ``facts`` at ``path``, keeping the other entries (call it holding
    the lock, or accept that the last writer wins); False (and a warning) if it could not."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
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


def read_or_measure(path: Path, facts: MeasureFacts, measure: Callable[[], Throughput],
                    lock_wait: float = LOCK_WAIT) -> tuple[Throughput, bool]:
    """``(throughput, from the cache)``: the entry for ``facts`` at ``path``, else ``measure()``
    under the lock, then stored (a number that is not positive and finite is not stored)."""
    hit = read_cached(path, facts)
    if hit is not None:
        return hit, True
    with _locked(path, lock_wait):
        hit = read_cached(path, facts)  # measured by the node that held the lock
        if hit is not None:
            return hit, True
        throughput = measure()
        try:
            write_cached(path, facts, throughput, time.time())
        except ValueError as exc:  # e.g. 0 tokens/s: measured again next time
            log.warning("throughput cache %s: %s; not stored", path, exc)
    return throughput, False
