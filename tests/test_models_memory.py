"""A span of 2 of 8 blocks really loads only those: peak memory measured in fresh processes.

Each measurement runs in its own Python process: imports first, then the peak
resident set (VmHWM) is reset through /proc/self/clear_refs, then the load runs and
every weight is touched (safetensors can return tensors that map the file lazily),
and the new peak minus the resident set before the load is reported. Blocks are made big
enough (hidden 512, ~15 MB each in fp32) that they dominate the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support_models import make_tiny_checkpoint

PROBE = r"""
import json, sys, time
import torch
from transformers import AutoModelForCausalLM
from biopetals.models.blocks import BlockSpan
from biopetals.models.client_parts import ClientParts

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, mode = sys.argv[1], sys.argv[2]
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS counter
t = time.perf_counter()
if mode == "transformers":
    obj = AutoModelForCausalLM.from_pretrained(path)
elif mode == "client":
    obj = ClientParts.load(path)
else:
    start, end = map(int, mode.split(":"))
    obj = BlockSpan.load(path, start, end)
seconds = time.perf_counter() - t
# safetensors may hand back tensors that still map the file: touch every weight so
# its pages are resident and counted
touched = sum(float(p.float().sum()) for p in obj.parameters())
print(json.dumps({"peak": status("VmHWM") - before, "seconds": seconds}))
"""


def measure(path: Path, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), mode], check=True, capture_output=True, text=True, timeout=120
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_two_of_eight_blocks_peak_under_40_percent(tmp_path, capsys):
    path = make_tiny_checkpoint(
        tmp_path / "wide",
        with_tokenizer=False,
        hidden_size=512,
        intermediate_size=2048,
        num_heads=8,
        num_kv_heads=2,
        max_shard_size="20MB",
    )
    span2 = measure(path, "2:4")
    span8 = measure(path, "0:8")
    whole = measure(path, "transformers")
    with capsys.disabled():
        mb = 1 / 2**20
        print(
            f"\npeak RSS over imports: span 2 of 8 blocks {span2['peak'] * mb:.1f} MiB "
            f"({span2['seconds']:.2f} s); span of all 8 {span8['peak'] * mb:.1f} MiB ({span8['seconds']:.2f} s); "
            f"transformers from_pretrained {whole['peak'] * mb:.1f} MiB ({whole['seconds']:.2f} s)"
        )
    assert span2["peak"] <= 0.40 * span8["peak"]
    assert span2["peak"] <= 0.40 * whole["peak"]
