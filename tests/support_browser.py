"""Headless Chromium for page tests: the system's /usr/bin/chromium (Debian's package), driven by Playwright.

Playwright never downloads a browser here: it launches ``CHROMIUM`` with a fresh profile
directory and flags that keep it off the network (no background fetches, updates, sync
or QUIC). Tests skip with a clear reason when the browser or Playwright is missing;
``.ci/run`` installs the browser with apt.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import pytest

__all__ = ["CHROMIUM", "FLAGS", "browser_page"]

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[object]:
    """A Playwright page in a fresh headless Chromium profile (skips the test without Chromium)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium package (apt-get install chromium), "
                    "as .ci/run does, to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip '.[test]')")
    with tempfile.TemporaryDirectory(prefix="biopetals-chromium-") as profile, sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": width, "height": height})
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
