"""Verified computation on real node processes (issue 20 item 5; client/verification.py).

A node that announces 10^9 tokens/s (so that routes choose it) and adds noise as large as its
output to its inference steps (tests/broken_node.py ``corrupt,fast-liar``) serves blocks 0:8
beside two honest nodes. A client with ``verify=1.0`` (paranoid) recomputes every step on a
replica; the disagreement is arbitrated by the third node, the liar is avoided for good, the
chain is rebuilt on honest nodes, the evidence is written to the chosen directory, and the greedy
tokens equal transformers' on the same checkpoint. A liar corrupting 10 % of steps is found as
well, and so are a stateless forward pass and a backward pass through the liar. An honest swarm at ``verify=1.0`` raises no false alarm with f32 nor with f16 activations, and without a replica the client says so
once and carries on unverified.
The rules (sampling, tolerance, arbitration, avoidance) are tested without processes in
tests/test_verification.py.
"""

from __future__ import annotations

import json
import logging

import pytest
import support_swarm
import torch
from support_models import make_tiny_checkpoint
from support_swarm import Swarm
from test_chain_binding import prompt_ids
from test_conformance import BROKEN_NODE
from transformers import AutoModelForCausalLM

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.remote_forward import backward_all
from biopetals.client.routing import RouteSpan

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

HONEST = ("--no-benchmark",)
TOKENS = 8


def _model(checkpoint, swarm, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, step_timeout=30.0, seed=1,
        **options)


@pytest.mark.parametrize("rate", ["1.0", pytest.param("0.1", marks=pytest.mark.slow)])
def test_a_corrupting_node_is_found_avoided_and_the_output_equals_transformers(tmp_path, monkeypatch, caplog, rate):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_ids(checkpoint)
    evidence = tmp_path / "evidence"
    with Swarm(tmp_path) as swarm:
        honest = [swarm.start_node(checkpoint, "0:8", *HONEST) for _ in range(2)]
        monkeypatch.setattr(support_swarm, "NODE_COMMAND", BROKEN_NODE)
        liar = swarm.start_node(checkpoint, "0:8", env={"BIOPETALS_BROKEN": "corrupt,fast-liar",
                                                        "BIOPETALS_CORRUPT_RATE": rate})
        model = _model(checkpoint, swarm, codec="f32", verify=1.0, verify_evidence_dir=str(evidence))
        try:
            with caplog.at_level(logging.WARNING, logger="biopetals.client.verify"):
                with model.inference_session(max_length=ids.shape[1] + TOKENS) as session:
                    ours = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
                    route = [p for p, _, _ in session.route[0]]
                    rebuilds = session.chains[0].state.rebuilds
            assert model.swarm.verifier.is_liar(liar.peer_id)
            assert not any(model.swarm.verifier.is_liar(h.peer_id) for h in honest)
        finally:
            model.close()
        if rate == "1.0":
            stateless_calls_through_the_liar_are_checked(checkpoint, swarm, reference, ids, liar, honest[0])
    assert torch.equal(ours, reference.generate(ids, max_new_tokens=TOKENS, do_sample=False))
    assert rebuilds >= 1 and liar.peer_id not in route
    assert any(liar.peer_id in r.message and "avoiding it" in r.message for r in caplog.records)
    lines = [json.loads(line) for line in (evidence / "evidence.jsonl").read_text().splitlines()]
    assert lines[0]["liar"] == liar.peer_id == lines[0]["accused"] and lines[0]["verdict"] == "liar"
    assert {lines[0]["replica"], lines[0]["arbiter"]} == {h.peer_id for h in honest}
    assert lines[0]["errors"]["replica"] > lines[0]["tolerance"] >= lines[0]["errors"]["arbiter_vs_replica"]
    assert (evidence / lines[0]["tensors"]).is_file()


def stateless_calls_through_the_liar_are_checked(checkpoint, swarm, reference, ids, liar, honest):
    """Fresh clients (who do not know the liar yet): a forward pass through it is checked and rerun, and
    so is a ``Backward`` of a trace that names it (as a forward made before it was found would)."""
    model = _model(checkpoint, swarm, codec="f32", verify=1.0)
    try:
        logits = model(ids).logits
        assert model.swarm.verifier.is_liar(liar.peer_id)
    finally:
        model.close()
    torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    model = _model(checkpoint, swarm, codec="f32", verify=1.0)
    try:
        remote = model.swarm
        servers = {s.peer_id: s for s in remote.loop.run(remote.fetch_servers())}
        x, g = torch.randn(2, 1, 5, reference.config.hidden_size, generator=torch.Generator().manual_seed(0))
        grad, _ = remote.loop.run(backward_all(remote, [(RouteSpan(servers[liar.peer_id], 0, 8), x)], g))
        assert remote.verifier.is_liar(liar.peer_id)
        honest_grad, _ = remote.loop.run(remote.backward(RouteSpan(servers[honest.peer_id], 0, 8), x, g, "f32"))
    finally:
        model.close()
    torch.testing.assert_close(grad, honest_grad, rtol=1e-4, atol=1e-5)


def test_an_honest_swarm_raises_no_false_alarm_at_every_step(tmp_path, caplog):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny-llama")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = prompt_ids(checkpoint)
    expected = reference.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    with Swarm(tmp_path) as swarm:
        swarm.start_node(checkpoint, "0:8", *HONEST)
        second = swarm.start_node(checkpoint, "0:8", *HONEST)
        for codec in ("f32", "f16"):
            model = _model(checkpoint, swarm, codec=codec, verify=1.0)
            try:
                with caplog.at_level(logging.WARNING, logger="biopetals.client.verify"):
                    ours = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
                verifier = model.swarm.verifier
                assert verifier.checks >= TOKENS and verifier.disagreements == 0 and not verifier.liars, codec
                # a stateless forward pass is checked too
                model(ids)
                assert verifier.checks >= TOKENS + 1 and verifier.disagreements == 0, codec
            finally:
                model.close()
            if codec == "f32":
                assert torch.equal(ours, expected)
        assert not [r for r in caplog.records if "verification" in r.message], [r.message for r in caplog.records]
        # without a replica the client says so once and carries on unverified
        second.stop()
        model = _model(checkpoint, swarm, codec="f32", verify=1.0)
        try:
            with caplog.at_level(logging.WARNING, logger="biopetals.client.verify"):
                ours = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert model.swarm.verifier.checks == 0
        finally:
            model.close()
    assert torch.equal(ours, expected[:, :ids.shape[1] + 3])
    said = [r.message for r in caplog.records if "unverified" in r.message]
    assert said == ["verification: blocks 0:8 run unverified: no other node serves these blocks with the same "
                    "weights"], said
