"""transport/'s sans-IO rule modules (budget, admission, logs) import no event loop, socket or clock
(tests/test_sans_io.py's check); that transport/ has no import cycle is tests/test_layers.py's check,
over the whole package."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_sans_io import violations

TRANSPORT = Path(__file__).resolve().parents[1] / "transport"


@pytest.mark.parametrize("name", ["budget", "admission", "logs"])
def test_rule_modules_are_sans_io(name: str) -> None:
    assert violations(TRANSPORT / f"{name}.py") == []
