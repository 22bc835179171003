"""``biopetals-swarm`` tells the truth about a node killed without a word (issue 24, item 4).

Real node processes; one gets ``kill -9`` (its ONLINE announcement stays in the DHT until it
expires); the monitor's very first run after the kill must show it UNREACHABLE, its blocks
uncovered, and exit 1 (no waiting for the announcement to expire; each probe is bounded by
``--timeout``, 3 s by default).
"""

from __future__ import annotations

import json
import re
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
        first = swarm.start_node(ckpt, "0:1", "--no-benchmark", "--public-name", "lab-a gpu3")
        second = swarm.start_node(ckpt, "1:2", "--no-benchmark")
        args = ["--model", str(ckpt), "--swarm-key", str(swarm.key_path), "--initial-peers", first.addr]
        ok = subprocess.run(MONITOR + args, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "all 2 blocks served" in ok.stdout and "UNREACHABLE" not in ok.stdout
        assert re.search(rf"0:1 +lab-a gpu3 +{first.peer_id} +ONLINE", ok.stdout), ok.stdout
        second.kill()
        started = time.monotonic()
        dead = subprocess.run(MONITOR + args, capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        data = json.loads(subprocess.run(MONITOR + args + ["--json"], capture_output=True, text=True,
                                         timeout=60).stdout)
    assert dead.returncode == 1, dead.stdout + dead.stderr
    print(f"monitor run right after kill -9: {took:.1f} s, interpreter start-up included")  # timed in no test
    assert f"UNREACHABLE {second.peer_id}" in dead.stdout
    assert "NOT SERVED: blocks 1:2 have no online node" in dead.stdout
    states = {n["peer_id"]: n["state"] for n in data["nodes"]}
    assert {n["peer_id"]: n["public_name"] for n in data["nodes"]} == {first.peer_id: "lab-a gpu3", second.peer_id: None}
    assert states == {first.peer_id: "ONLINE", second.peer_id: "UNREACHABLE"}
    assert data["missing"] == [[1, 2]] and data["online_per_block"] == [1, 0]


def test_public_name_is_an_optional_announcement_field():
    """spec/announcement.md §2, key 12 (revision 3): bounded like a label, absent when not given."""
    from biopetals.protocol.announcement import Announcement, State, decode_announcement, encode_announcement
    from biopetals.protocol.errors import ProtocolError

    fields = dict(state=State.ONLINE, start=0, end=2, inference_tps=1.0, forward_tps=2.0, cache_tokens_left=3,
                  dtype="float32", quant="none", version="v")
    plain = encode_announcement(Announcement(**fields))
    assert decode_announcement(plain).public_name is None and 12 not in __import__("msgpack").unpackb(plain,
                                                                                                      strict_map_key=False)
    named = Announcement(**fields, public_name="lab-a gpu3")
    assert decode_announcement(encode_announcement(named)).public_name == "lab-a gpu3"
    with pytest.raises(ProtocolError) as exc:
        Announcement(**fields, public_name="x" * 65)
    assert exc.value.code.name == "LIMIT_EXCEEDED"
