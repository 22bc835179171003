"""Start-up phase marks of a node, read by benchmarks/bench_startup.py (issue 23 item 5).

``mark(phase)`` logs one INFO line ``startup <phase> wall=<time.time()> cpu=<process CPU s>``
on the ``biopetals.node.startup`` logger (shown with ``biopetals-node -v``); it changes
nothing else. CPU time is the process's own, so phases stay comparable on a busy machine.
"""

from __future__ import annotations

import logging
import time

__all__ = ["mark", "PREFIX"]

PREFIX = "startup "
log = logging.getLogger("biopetals.node.startup")


def mark(phase: str, wall: float | None = None, cpu: float | None = None) -> None:
    """Log that ``phase`` ended now (or at ``wall``/``cpu``, taken earlier)."""
    log.info("%s%s wall=%.6f cpu=%.6f", PREFIX, phase, time.time() if wall is None else wall,
             time.process_time() if cpu is None else cpu)
