"""Aggregated warnings: a flood of one kind of event writes one line per interval, with counts.

See spec/transport.md §3.16.3. A keyless outsider can make a node fail thousands of
handshakes a second; logging each would turn the node's log into an amplifier
(12.8 MB in 40 s, issue 21). ``LogAggregator.note`` decides, per kind of event,
whether a line is written now: the first event of an interval is written whole,
later ones in the same interval are only counted, and the next line written for
that kind says how many were left out and from how many sources (top sources
first). Sans-IO: the caller passes the time and writes the returned line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

__all__ = ["LogAggregator", "LOG_INTERVAL"]

#: Default seconds between two lines of the same kind.
LOG_INTERVAL: Final = 10.0
#: Distinct sources counted per kind and interval; more are counted as "others".
_MAX_SOURCES: Final = 256


@dataclass
class _Kind:
    since: float
    left_out: int = 0
    sources: Counter[str] = field(default_factory=Counter)


class LogAggregator:
    """``note(kind, source, message, now)`` returns the line to log now, or None (counted)."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._kinds: dict[str, _Kind] = {}
        self.lines = 0  # lines returned since start
        self.events = 0  # events noted since start

    def note(self, kind: str, source: str, message: str, now: float) -> str | None:
        self.events += 1
        state = self._kinds.get(kind)
        if state is not None and now - state.since < self.interval:
            state.left_out += 1
            if source in state.sources or len(state.sources) < _MAX_SOURCES:
                state.sources[source] += 1
            else:
                state.sources["others"] += 1
            return None
        line = f"{kind}: {message}"
        if state is not None and state.left_out:
            line += self._summary(state, now)
        self._kinds[kind] = _Kind(since=now)
        self.lines += 1
        return line

    def flush(self, now: float) -> list[str]:
        """Lines for every kind with events left out so far (e.g. at shutdown)."""
        out = []
        for kind, state in self._kinds.items():
            if state.left_out:
                out.append(f"{kind}:{self._summary(state, now)}")
                self._kinds[kind] = _Kind(since=now)
        self.lines += len(out)
        return out

    @staticmethod
    def _summary(state: _Kind, now: float) -> str:
        top = ", ".join(f"{source} x{n}" for source, n in state.sources.most_common(3))
        return f" (and {state.left_out} more like it in the last {now - state.since:.0f} s, from {len(state.sources)} sources: {top})"
