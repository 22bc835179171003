"""The distributed model against transformers' own, over real node processes on loopback.

A tiny random Llama-3-style checkpoint (8 blocks, GQA, llama3 rope scaling, sharded)
is served by ``biopetals-node`` processes; the reference is
``AutoModelForCausalLM.from_pretrained`` of the same directory, fp32. Activations
travel as f32 (lossless) so greedy tokens must be identical and logits within 1e-4.

Failover (a killed node, a stalled node, replay) is decided by the sans-IO chain state and
tested with a fake clock in tests/test_client_chain.py; tests/test_client_ptune.py shows on
real processes that the drivers wire it up (a stalled then a killed node, exact logits).
"""

from __future__ import annotations

import time

import pytest
import torch
from support_models import make_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextStreamer

from biopetals.client import AutoDistributedModelForCausalLM, MissingBlocksError
from biopetals.client.local_swarm import LocalSwarm

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("client") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 3), (3, 6), (6, 8)]) as s:
        yield s


@pytest.fixture(scope="module")
def model(checkpoint, swarm):
    m = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", step_timeout=30.0
    )
    yield m
    m.close()


def prompt_ids(tokenizer_path, text="The mitochondria is the powerhouse"):
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return tok(text, return_tensors="pt").input_ids


def test_client_holds_only_embeddings_norm_and_head(model, reference):
    names = {n for n, _ in model.named_parameters()}
    assert names == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    full = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert model.client_nbytes() < 0.5 * full


def test_greedy_generate_equals_transformers(model, reference, checkpoint):
    ids = prompt_ids(checkpoint)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                  return_dict_in_generate=True, output_logits=True)
    ours = model.generate(ids, **kwargs)
    ref = reference.generate(ids, **kwargs)
    assert ours.sequences.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(ours.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff <= 1e-4, diff
    assert [s for _, s, _ in model.last_route[0]] == [0, 3, 6]


def test_forward_with_labels_matches_and_backpropagates(model, reference, checkpoint):
    ids = prompt_ids(checkpoint, "DNA is transcribed into RNA, which is translated into protein.")
    ours = model(ids, labels=ids)
    ref = reference(ids, labels=ids)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-4
    assert ours.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    # gradients reach client-side inputs through the nodes' Backward
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb, labels=ids).loss.backward()
    emb_ref = reference.model.embed_tokens(ids).detach().requires_grad_(True)
    reference(inputs_embeds=emb_ref, labels=ids).loss.backward()
    assert (emb.grad - emb_ref.grad).abs().max().item() <= 1e-5


def test_sampling_with_penalty_and_seed_matches(model, reference, checkpoint):
    ids = prompt_ids(checkpoint)
    kwargs = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(123)
    ours = model.generate(ids, **kwargs)
    torch.manual_seed(123)
    ref = reference.generate(ids, **kwargs)
    assert torch.equal(ours, ref)


PADDED_PROMPTS = ["The mitochondria is", "Enzymes lower the activation energy of chemical reactions", "DNA"]


def padded_batch(checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"
    batch = tok(PADDED_PROMPTS, return_tensors="pt", padding=True)
    lengths = batch.attention_mask.sum(1).tolist()
    assert len(set(lengths)) == 3, lengths  # three different amounts of left padding
    return tok, batch


def test_batch_with_left_padding_matches(model, reference, checkpoint):
    """A left-padded batch runs as ONE session (the mask travels with each step, spec/messages.md §8.1)
    and gives exactly transformers' tokens, logits within 1e-4."""
    tok, batch = padded_batch(checkpoint)
    kwargs = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                  return_dict_in_generate=True, output_logits=True)
    ours = model.generate(**batch, **kwargs)
    ref = reference.generate(**batch, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    diff = max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits))
    assert diff <= 1e-4, diff
    assert len(model.last_route) == 1 and [s for _, s, _ in model.last_route[0]] == [0, 3, 6]


def test_forward_with_padding_mask_matches(model, reference, checkpoint):
    """``model(ids, attention_mask=..., labels=...)`` of a padded batch: one Forward per span, loss and
    logits as transformers' (positions 0..T-1 like its forward, §6.1), gradients through Backward."""
    _, batch = padded_batch(checkpoint)
    ids, mask = batch.input_ids, batch.attention_mask
    labels = ids.masked_fill(mask == 0, -100)
    ours = model(ids, attention_mask=mask, labels=labels)
    ref = reference(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert (ours.logits[real] - ref.logits[real]).abs().max().item() <= 1e-4
    assert ours.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    model(inputs_embeds=emb, attention_mask=mask, labels=labels).loss.backward()
    emb_ref = reference.model.embed_tokens(ids).detach().requires_grad_(True)
    reference(inputs_embeds=emb_ref, attention_mask=mask, labels=labels).loss.backward()
    assert (emb.grad - emb_ref.grad).abs().max().item() <= 1e-5


def test_stopping_criteria_and_streamer(model, reference, checkpoint, capsys):
    class StopAfter(StoppingCriteria):
        def __init__(self, n):
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.n, dtype=torch.bool)

    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = prompt_ids(checkpoint)
    stop = StoppingCriteriaList([StopAfter(ids.shape[1] + 5)])
    ours = model.generate(ids, max_new_tokens=50, do_sample=False, stopping_criteria=stop,
                          streamer=TextStreamer(tok))
    ref = reference.generate(ids, max_new_tokens=50, do_sample=False, stopping_criteria=stop)
    assert ours.shape[1] == ids.shape[1] + 5
    assert torch.equal(ours, ref)
    assert tok.decode(ours[0, ids.shape[1]:]).strip()[:5] in capsys.readouterr().out


def test_inference_session_continues_generation(model, reference, checkpoint):
    ids = prompt_ids(checkpoint)
    full = reference.generate(ids, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=64) as session:
        first = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert session.position == ids.shape[1] + 5  # the last generated token is not fed yet
        second = model.generate(first[:, -1:], max_new_tokens=6, do_sample=False)
    assert torch.equal(torch.cat([first, second[:, 1:]], dim=1), full)


def test_missing_blocks_error_names_blocks_and_nodes(checkpoint, swarm):
    # a swarm serving blocks 0:3 only of this model
    with LocalSwarm(checkpoint, [(0, 3)]) as partial:
        m = AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=partial.initial_peers,
                                                            swarm_key=partial.key_path)
        try:
            with pytest.raises(MissingBlocksError) as info:
                m.generate(prompt_ids(checkpoint), max_new_tokens=2)
        finally:
            m.close()
    assert info.value.missing == [(3, 8)]
    assert "3..7" in str(info.value) and partial.nodes[0].peer_id in str(info.value)


def test_a_request_over_the_models_length_is_raised_at_once_and_no_node_is_avoided(model, swarm, checkpoint):
    """Every node refuses a session longer than the model's positions (LIMIT_EXCEEDED, spec/messages.md §5.1):
    the request's fault, not a node's (client/chain.py): raised at once, and no node is avoided."""
    t = time.monotonic()
    with pytest.raises(ValueError, match="limit|max_length") as info:
        with model.inference_session(max_length=300):  # the checkpoint has 256 positions
            model.generate(prompt_ids(checkpoint), max_new_tokens=2)
    print(f"{type(info.value).__name__}: {info.value}")
    assert time.monotonic() - t < 10
    assert [model.swarm.health.failures(n.peer_id) for n in swarm.nodes] == [0, 0, 0]


@pytest.mark.parametrize("probe", [True, False])
def test_first_route_weighs_measured_round_trips(swarm, checkpoint, probe):
    """Before routing, the client pings candidate nodes it has no RTT for (RemoteSwarm.probe_rtts),
    so its first route already weighs measured round trips, not a default guess."""
    from biopetals.client.swarm import ClientConfig, RemoteSwarm
    from biopetals.models.config import model_info

    config = ClientConfig(initial_peers=tuple(swarm.initial_peers), swarm_key=swarm.key_path,
                          rtt_probe_timeout=5.0 if probe else 0.0)
    remote = RemoteSwarm(model_info(checkpoint).dht_prefix, 8, config)
    try:
        route = remote.loop.run(remote.find_route(0, 8), timeout=30)
        assert [(r.start, r.end) for r in route] == [(0, 3), (3, 6), (6, 8)]
        rtts = remote.rtts()
        nodes = {n.peer_id for n in swarm.nodes}
        if probe:
            assert nodes <= set(rtts) and all(0 < rtts[p] < 1.0 for p in nodes)
        else:
            assert not nodes <= set(rtts)  # at most the DHT's bootstrap connection, not yet measured
    finally:
        remote.close()
