"""Requests split into messages (client/chunking.py) on real node processes, against transformers.

Two ``biopetals-node`` processes serve a tiny random Llama-3-style checkpoint (hidden
size 64, llama3 rope scaling, sharded); the client's element limit is lowered through its
named parameter ``max_message_elements`` (a sender MAY send under smaller limits than
spec/tensors.md §2; the nodes keep the spec's) so that at this width a modest prompt needs
several messages, as a 4200-token prompt does at Llama-3-8B's width 4096. Activations
travel as f32: greedy tokens equal transformers', logits within 1e-4, gradients within 1e-5.
The rule's sizes at real widths and failover with chunked history: tests/test_client_chunking.py.
"""

from __future__ import annotations

import time

import pytest
import torch
from support_models import make_tiny_checkpoint
from support_two_nodes import f32_client, swarm  # noqa: F401 (``swarm`` is a fixture)
from transformers import AutoModelForCausalLM

from biopetals.client.errors import RequestError

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

HIDDEN = 64
TOKENS_PER_STEP = 8
LIMIT = HIDDEN * TOKENS_PER_STEP  # elements: 8 tokens of one sequence, or one sequence of 8 tokens a call


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chunking") / "tiny-llama", hidden_size=HIDDEN)


@pytest.fixture(scope="module")
def model(checkpoint, swarm):
    """The client under the lowered element limit, and transformers' model of the same checkpoint."""
    m = f32_client(checkpoint, swarm, max_message_elements=LIMIT)
    yield m, AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    m.close()


def test_a_prefill_over_the_message_limit_goes_in_steps_and_greedy_tokens_equal_transformers(model):
    model, reference = model
    ids = torch.randint(4, 320, (1, 37), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)
    with model.inference_session(max_length=64) as session:
        ours = model.generate(ids, **kwargs)
        fed = [tuple(f.hidden.shape) for f in session.chains[0].spans[0].history]
    ref = reference.generate(ids, **kwargs)
    assert torch.equal(ours.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(ours.logits, ref.logits)) <= 1e-4
    # the 37-token prefill went as 8 + 8 + 8 + 8 + 5 tokens, then one token a step
    assert fed == [(1, 8, HIDDEN)] * 4 + [(1, 5, HIDDEN)] + [(1, 1, HIDDEN)] * 11


def test_forward_and_backward_of_a_batch_over_the_limit_go_in_groups_and_match(model):
    model, reference = model
    ids = torch.randint(4, 320, (4, 8), generator=torch.Generator().manual_seed(2))
    calls = []
    forward, backward = model.swarm.forward, model.swarm.backward

    async def counted_forward(span, hidden, *args):
        calls.append(("F", span.start, tuple(hidden.shape)))
        return await forward(span, hidden, *args)

    async def counted_backward(span, hidden, *args):
        calls.append(("B", span.start, tuple(hidden.shape)))
        return await backward(span, hidden, *args)

    model.swarm.forward, model.swarm.backward = counted_forward, counted_backward
    try:
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
        ours = model(inputs_embeds=emb, labels=ids)
        ours.loss.backward()
    finally:
        model.swarm.forward, model.swarm.backward = forward, backward
    emb_ref = reference.model.embed_tokens(ids).detach().requires_grad_(True)
    ref = reference(inputs_embeds=emb_ref, labels=ids)
    ref.loss.backward()
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-4
    assert ours.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)
    assert (emb.grad - emb_ref.grad).abs().max().item() <= 1e-5
    # one sequence a call, both ways: 4 Forward per span, then 4 Backward per span in reverse
    assert calls == [("F", 0, (1, 8, HIDDEN))] * 4 + [("F", 4, (1, 8, HIDDEN))] * 4 + \
        [("B", 4, (1, 8, HIDDEN))] * 4 + [("B", 0, (1, 8, HIDDEN))] * 4


def test_a_sequence_too_long_for_one_call_is_refused_before_sending_and_no_node_is_avoided(model, swarm):
    model, _ = model
    ids = torch.randint(4, 320, (1, TOKENS_PER_STEP + 1))
    t = time.monotonic()
    with pytest.raises(RequestError, match=f"refused before sending.*at most {TOKENS_PER_STEP} tokens"):
        model(ids)
    # inputs any node would refuse (NaN, spec/messages.md §7.3; another width): the same
    emb = model.model.embed_tokens(ids[:, :4]).detach()
    emb[0, 1, 3] = float("nan")
    with pytest.raises(RequestError, match="NON_FINITE"):
        model(inputs_embeds=emb)
    with model.inference_session(max_length=16) as session:
        with pytest.raises(RequestError, match="HIDDEN_SIZE_MISMATCH"):
            session.step(torch.zeros(1, 2, HIDDEN + 1))
        assert session.step(torch.zeros(1, 2, HIDDEN)).shape == (1, 2, HIDDEN)  # the session still works
    assert time.monotonic() - t < 10
    assert [model.swarm.health.failures(n.peer_id) for n in swarm.nodes] == [0, 0]
