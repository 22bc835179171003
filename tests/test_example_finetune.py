"""The fine-tuning example (examples/finetune.py) runs end to end, and its data set is what the README says.

The run uses a tiny random checkpoint (a 2-node swarm, a few steps on 8 pairs of the
bundled set) so that it takes seconds; the SmolLM2 run is the README's. It must print a
loss per step, the evaluations before and after, and save prompts that load back.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support_models import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune.py"
DATA = ROOT / "examples" / "data" / "biomed_qa.tsv"

pytestmark = pytest.mark.timeout(300)


def load_pairs(path):
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        from finetune import load_pairs as load
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    return load(path)


def test_bundled_data_set_parses_and_states_its_licence():
    pairs = load_pairs(DATA)
    assert len(pairs) >= 200 and len(set(q for q, _ in pairs)) == len(pairs)
    header = [line for line in DATA.read_text().splitlines() if line.startswith("#")]
    assert any("CC0-1.0" in line for line in header) and any("Written for this repository" in line for line in header)


def test_bad_data_lines_are_refused(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("# comment\nno tab here\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        load_pairs(bad)


def test_example_trains_over_a_local_swarm_and_saves_prompts(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny")
    data = tmp_path / "small.tsv"
    data.write_text("\n".join(DATA.read_text().splitlines()[:5 + 10]) + "\n")
    out = tmp_path / "prompts.pt"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--model", str(ckpt), "--nodes", "2", "--steps", "3", "--batch-size", "4",
         "--pre-seq-len", "4", "--codec", "f32", "--show", "1", "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout + result.stderr
    for line in ("step   1: loss", "step   3: loss", "Before training: held-out answer loss",
                 "After training: held-out answer loss", "     model:", "Trained prompts saved"):
        assert line in text, text[-3000:]
    state = torch.load(out)
    assert state["tuning_mode"] == "deep_ptune" and state["pre_seq_len"] == 4
    assert state["state_dict"]["deep"].shape == (8, 4, 64) and state["state_dict"]["deep"].abs().max() > 0
