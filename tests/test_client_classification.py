"""Sequence classification over real node processes, against transformers' ``LlamaForSequenceClassification``.

Two ``biopetals-node`` processes split a tiny random checkpoint; the reference is
``AutoModelForSequenceClassification`` of the same directory, whose new ``score``
head is copied into ours. Left-padded batches, f32 activations: logits within 1e-5,
gradients of the prompts and the head within 1e-5 relative, and a 30-step AdamW
prompt-tuning run with the same loss curve (1e-4 per step).
"""

from __future__ import annotations

import copy

import pytest
import torch
from support_finetune import relative_error, with_prompts
from support_models import make_tiny_checkpoint
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from biopetals.client import AutoDistributedModelForSequenceClassification, DistributedLlamaForSequenceClassification
from biopetals.client.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)

P = 2
LABELS = 3
TEXTS = ["The mitochondria is the powerhouse of the cell.", "Enzymes lower the activation energy",
         "DNA is transcribed into RNA.", "Ribosomes read messenger RNA three bases at a time."]
TARGETS = torch.tensor([0, 2, 1, 2])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cls") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=LABELS, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 3), (3, 8)]) as s:
        yield s


@pytest.fixture(scope="module")
def batch(checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"  # transformers pools inputs_embeds at the last position: left padding makes it right
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any()
    return enc.input_ids, enc.attention_mask


def connect(checkpoint, swarm, reference, **kwargs):
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", num_labels=LABELS,
        **kwargs)
    with torch.no_grad():
        model.score.weight.copy_(reference.score.weight)
    return model


def test_logits_and_loss_equal_transformers(checkpoint, swarm, reference, batch):
    ids, mask = batch
    with connect(checkpoint, swarm, reference) as model:
        assert isinstance(model, DistributedLlamaForSequenceClassification)
        assert model.lm_head is None and model.config.num_labels == LABELS
        ours = model(input_ids=ids, attention_mask=mask, labels=TARGETS)
    ref = reference(input_ids=ids, attention_mask=mask, labels=TARGETS)
    assert ours.logits.shape == (len(TEXTS), LABELS)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-5
    assert ours.loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)


def reference_loss(reference, ids, mask, prompts, deep):
    return with_prompts(reference, ids, mask, prompts, deep, labels=TARGETS).loss


def test_prompt_and_head_gradients_equal_local_autograd(checkpoint, swarm, reference, batch):
    ids, mask = batch
    torch.manual_seed(3)
    with connect(checkpoint, swarm, reference, tuning_mode="deep_ptune", pre_seq_len=P) as model:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"tuning.prompts", "tuning.deep", "score.weight"}
        with torch.no_grad():
            model.tuning.deep.normal_(0, 0.5)
        model(input_ids=ids, attention_mask=mask, labels=TARGETS).loss.backward()
        ref = copy.deepcopy(reference)
        prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
        deep = model.tuning.deep.detach().clone().requires_grad_(True)
        reference_loss(ref, ids, mask, prompts, deep).backward()
        for name, ours, theirs in (("prompts", model.tuning.prompts.grad, prompts.grad),
                                   ("deep prompts", model.tuning.deep.grad, deep.grad),
                                   ("score head", model.score.weight.grad, ref.score.weight.grad)):
            assert theirs.abs().max() > 0, name
            err = relative_error(ours, theirs)
            print(f"{name}: max abs diff {(ours - theirs).abs().max().item():.3e}, relative {err:.3e}")
            assert err <= 1e-5, (name, err)


def test_training_loss_curve_equals_local_run(checkpoint, swarm, reference, batch):
    ids, mask = batch
    torch.manual_seed(4)
    with connect(checkpoint, swarm, reference, tuning_mode="ptune", pre_seq_len=P) as model:
        ref = copy.deepcopy(reference)
        ref.requires_grad_(False)
        ref.score.weight.requires_grad_(True)
        prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([model.tuning.prompts, model.score.weight], lr=0.05)
        ref_opt = torch.optim.AdamW([prompts, ref.score.weight], lr=0.05)
        ours, theirs = [], []
        for _ in range(30):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=TARGETS).loss
            loss.backward()
            opt.step()
            ours.append(loss.item())
            ref_opt.zero_grad()
            ref_loss = reference_loss(ref, ids, mask, prompts, None)
            ref_loss.backward()
            ref_opt.step()
            theirs.append(ref_loss.item())
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"classification: loss {ours[0]:.4f} -> {ours[-1]:.4f}; max per-step diff {max(diffs):.2e}")
    assert ours[-1] < 0.5 * ours[0]
    assert max(diffs) <= 1e-4, diffs
