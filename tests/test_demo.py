"""The README's main job: the demo's answer is transformers' own, not only fast.

Runs ``python -m biopetals.client.demo`` as the README does (3 real node processes on
loopback, bundled SmolLM2-135M-Instruct) and compares the answer it prints with local
transformers on the same checkpoint, in this test, independently of the demo's own check.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client.demo import DEFAULT_QUESTION, check_against_transformers
from biopetals.models.smollm2 import smollm2_path

pytestmark = [pytest.mark.timeout(600), pytest.mark.exactness]

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def local():
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": DEFAULT_QUESTION}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pad = tok.pad_token_id or tok.eos_token_id
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
    return path, tok, ids, ref, pad


def test_demo_answer_equals_local_transformers(local):
    _, tok, ids, ref, _ = local
    done = subprocess.run([sys.executable, "-m", "biopetals.client.demo", "--max-new-tokens", str(NEW_TOKENS),
                           "--check-tokens", str(NEW_TOKENS)], capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout + done.stderr
    answer = re.search(r"\nA: (.*)\n\n(\d+) tokens in", done.stdout, re.DOTALL)
    assert answer, done.stdout
    expected = tok.decode(ref[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.group(1).strip() == expected.strip()
    assert int(answer.group(2)) == ref.shape[1] - ids["input_ids"].shape[1]
    assert f"Check passed: the first {NEW_TOKENS} tokens equal local transformers." in done.stdout
    assert re.search(r"blocks +0:10 +served by 12D3KooW", done.stdout)


def test_demo_check_fails_on_a_wrong_answer(local, capsys):
    """The demo's own check can fail: one token changed is reported, with where."""
    path, _, ids, ref, pad = local
    wrong = ref.clone()
    wrong[0, ids["input_ids"].shape[1] + 5] += 1
    assert check_against_transformers(path, ids, ref, pad, 8)
    assert not check_against_transformers(path, ids, wrong, pad, 8)
    assert "differs from local transformers at token 5" in capsys.readouterr().err
