"""biopetals-api on the bundled SmolLM2-135M-Instruct (its own chat template): 4 concurrent streamed
greedy answers through the openai client equal transformers' own, token for token (slow: minutes)."""

from __future__ import annotations

import threading

import pytest
import torch
from support_api import APIServer
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client.local_swarm import LocalSwarm
from biopetals.models.smollm2 import smollm2_path

pytestmark = [pytest.mark.timeout(1200), pytest.mark.slow, pytest.mark.exactness]

QUESTIONS = ["What do ribosomes do?", "What is an enzyme?", "How do vaccines work?", "What does insulin do?"]
NEW = 32


def test_smollm2_concurrent_streamed_chats_equal_transformers(tmp_path):
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = {}
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = reference.generate(**ids, max_new_tokens=NEW, do_sample=False)
        expected[q] = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    got, errors = {}, []
    with LocalSwarm(path, [(0, 10), (10, 20), (20, 30)]) as swarm, \
            APIServer(path, swarm, "--codec", "f32", log_dir=tmp_path) as server:
        client = server.client(timeout=600)

        def ask(q):
            try:
                stream = client.chat.completions.create(model=path.name, messages=[{"role": "user", "content": q}],
                                                        temperature=0, max_tokens=NEW, stream=True)
                got[q] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
    assert not errors, errors
    assert got == expected
