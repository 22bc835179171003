"""client/verifying.py's history of a checked step (in process, no sockets).

A replica recomputes a step over its span's whole input history up to it; a step that the
history does not hold is a client bug, and checking it alone would compare the wrong
computation: ``_history_until`` raises a clear internal error instead.
"""

from __future__ import annotations

import pytest
import torch

from biopetals.client.chain import ChainSpan, Fed
from biopetals.client.routing import ServerSpan
from biopetals.client.verifying import _history_until


def _fed(step_id: int, position: int, tokens: int) -> Fed:
    return Fed(step_id=step_id, position=position, hidden=torch.zeros(1, tokens, 8))


def test_the_history_runs_up_to_the_step_included() -> None:
    span = ChainSpan(ServerSpan("12D3KooWpeer", 0, 2), 0, 2)
    span.history = [_fed(1, 0, 5), _fed(6, 5, 1), _fed(7, 6, 1)]
    assert _history_until(span, span.history[1]) == span.history[:2]
    assert _history_until(span, span.history[2]) == span.history


def test_a_step_missing_from_the_history_is_an_internal_error_never_checked_alone() -> None:
    span = ChainSpan(ServerSpan("12D3KooWpeer", 0, 2), 0, 2)
    span.history = [_fed(1, 0, 5)]
    stray = _fed(6, 5, 1)  # equal in value to no entry, and not the same object
    with pytest.raises(RuntimeError, match=r"internal error: the step 6 at position 5 is not in the history of blocks 0:2"):
        _history_until(span, stray)
    with pytest.raises(RuntimeError, match="internal error"):
        _history_until(span, _fed(1, 0, 5))  # an equal copy is not the step that was fed
