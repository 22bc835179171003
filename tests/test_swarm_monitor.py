"""``biopetals-swarm`` tells the truth about a node killed without a word (issue 24, item 4).

Real node processes; one gets ``kill -9`` (its ONLINE announcement stays in the DHT until it
expires); the monitor, run right after, must show it UNREACHABLE, its blocks uncovered, and
exit 1, within 10 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from support_models import make_tiny_checkpoint
from support_swarm import Swarm

pytestmark = pytest.mark.timeout(300)

MONITOR = [sys.executable, "-m", "biopetals.client.status"]


def test_a_killed_node_shows_unreachable_and_its_blocks_uncovered(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False, num_layers=2)
    with Swarm(tmp_path) as swarm:
        first = swarm.start_node(ckpt, "0:1", "--no-benchmark")
        second = swarm.start_node(ckpt, "1:2", "--no-benchmark")
        args = ["--model", str(ckpt), "--swarm-key", str(swarm.key_path), "--initial-peers", first.addr]
        ok = subprocess.run(MONITOR + args, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "all 2 blocks served" in ok.stdout and "UNREACHABLE" not in ok.stdout
        second.kill()
        started = time.monotonic()
        dead = subprocess.run(MONITOR + args, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        data = json.loads(subprocess.run(MONITOR + args + ["--json"], capture_output=True, text=True,
                                         timeout=60).stdout)
    assert dead.returncode == 1, dead.stdout + dead.stderr
    assert took < 10, f"the monitor took {took:.1f} s"
    assert f"UNREACHABLE {second.peer_id}" in dead.stdout
    assert "NOT SERVED: blocks 1:2 have no online node" in dead.stdout
    states = {n["peer_id"]: n["state"] for n in data["nodes"]}
    assert states == {first.peer_id: "ONLINE", second.peer_id: "UNREACHABLE"}
    assert data["missing"] == [[1, 2]] and data["online_per_block"] == [1, 0]
