"""Programs that start nodes for their user stop them however they end (issue 24, item 6).

A real parent process holds a ``LocalSwarm`` (the helper of the client demo, the API demo
and examples/finetune.py) of one real node process; the parent then gets SIGTERM,
SIGHUP, SIGINT (Ctrl-C) or SIGKILL, and the node must be gone within a bound.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support_models import make_tiny_checkpoint

pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")]

PARENT = textwrap.dedent("""
    import sys, time
    from biopetals.client.local_swarm import LocalSwarm
    try:
        with LocalSwarm(sys.argv[1], [(0, 1)], threads=1) as swarm:
            print("NODES", *[n.process.pid for n in swarm.nodes], flush=True)
            while True:
                time.sleep(0.2)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's init may be slow to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hygiene") / "m", with_tokenizer=False, num_layers=2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL],
                         ids=lambda s: signal.Signals(s).name)
def test_the_nodes_stop_with_the_program_that_started_them(tiny, sig):
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        line = parent.stdout.readline()
        assert line.startswith("NODES "), line
        pids = [int(p) for p in line.split()[1:]]
        assert all(_running(p) for p in pids)
        parent.send_signal(sig)
        parent.wait(30)
        if sig != signal.SIGKILL:
            assert parent.stdout.read().strip() == "INTERRUPTED"  # the with-block unwound
        deadline = time.monotonic() + 20
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in pids), f"nodes {pids} outlived their parent ({signal.Signals(sig).name})"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in locals().get("pids", []):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
