"""Prompt tuning and deep prompt tuning over real node processes, against transformers' own model.

Two ``biopetals-node`` processes split a tiny random Llama-3-style checkpoint; the
reference is ``AutoModelForCausalLM`` of the same directory with the same prompts
inserted by transformers-side hooks (``support_finetune``). Activations travel as f32
(lossless): gradients of the prompts and of the client's own weights must match
local autograd within 1e-5 relative, and a 30-step AdamW run must give the same loss
curve within 1e-4 per step. Decoding with prompts (stateless, and through inference
sessions, a stalled and a killed node included) gives transformers' logits.

Also here, on the same swarm: peft's LoRA on the parts the client holds (embeddings, LM
head), against transformers + peft with the same LoRA weights: gradients of every LoRA
tensor, a 10-step loss curve, and peft's ``save_pretrained`` / ``PeftModel.from_pretrained``
round trip onto a fresh distributed model. LoRA on the blocks' own modules (``q_proj``,
...) cannot be applied on the client, which does not hold them: peft says so.
"""

from __future__ import annotations

import copy
import os
import signal
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from support_finetune import relative_error, with_prompts
from support_models import make_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm
from biopetals.client.ptune import DistributedLlamaForCausalLMWithPrompts

pytestmark = pytest.mark.timeout(300)

P = 3
STEPS = 30
TEXTS = ["The mitochondria is the powerhouse of the cell.", "Enzymes lower the activation energy",
         "DNA is transcribed into RNA.", "Ribosomes read messenger RNA three bases at a time."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ptune") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 5), (5, 8)]) as s:
        yield s


def connect(checkpoint, swarm, mode):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32",
        tuning_mode=mode, pre_seq_len=P)


@pytest.fixture(scope="module")
def batch(checkpoint):
    """A left-padded batch (padding, prompts and labels together), labels -100 on padding."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    assert (enc.attention_mask == 0).any()
    return enc.input_ids, enc.attention_mask, labels


def reference_loss(reference, ids, mask, labels, prompts, deep):
    logits = with_prompts(reference, ids, mask, prompts, deep).logits[:, P:].contiguous()
    return reference.loss_function(logits=logits, labels=labels, vocab_size=reference.config.vocab_size)


def test_tuning_mode_builds_prompts_and_freezes_the_rest(checkpoint, swarm):
    with connect(checkpoint, swarm, "deep_ptune") as model:
        assert isinstance(model, DistributedLlamaForCausalLMWithPrompts)
        trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {"tuning.prompts": (P, 64), "tuning.deep": (8, P, 64)}
        assert not model.tuning.deep.detach().any()  # deep prompts start at zero: no change at first
    with pytest.raises(ValueError, match="tuning_mode"):
        connect(checkpoint, swarm, "prefix")
    with pytest.raises(ValueError, match="pre_seq_len"):
        AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                        swarm_key=swarm.key_path, tuning_mode="ptune")


def test_gradients_equal_local_autograd(checkpoint, swarm, reference, batch):
    """Deep prompts with non-zero values, a padded batch, and the client's own weights unfrozen:
    every gradient equals transformers' autograd on the same checkpoint."""
    ids, mask, labels = batch
    torch.manual_seed(1)
    with connect(checkpoint, swarm, "deep_ptune") as model:
        with torch.no_grad():
            model.tuning.prompts.normal_(0, 0.5)
            model.tuning.deep.normal_(0, 0.5)
        model.requires_grad_(True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        ref = copy.deepcopy(reference)
        prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
        deep = model.tuning.deep.detach().clone().requires_grad_(True)
        ref_loss = reference_loss(ref, ids, mask, labels, prompts, deep)
        ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-5)
        pairs = {
            "prompts": (model.tuning.prompts.grad, prompts.grad),
            "deep prompts": (model.tuning.deep.grad, deep.grad),
            "embeddings": (model.model.embed_tokens.weight.grad, ref.model.embed_tokens.weight.grad),
            "final norm": (model.model.norm.weight.grad, ref.model.norm.weight.grad),
            "lm head": (model.lm_head.weight.grad, ref.lm_head.weight.grad),
        }
        for name, (ours, theirs) in pairs.items():
            assert theirs.abs().max() > 0, name
            err = relative_error(ours, theirs)
            print(f"{name}: max abs diff {(ours - theirs).abs().max().item():.3e}, relative {err:.3e}")
            assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_training_loss_curve_equals_local_run(checkpoint, swarm, reference, batch, mode):
    """30 AdamW steps over the swarm and the same 30 steps locally: the same losses within 1e-4."""
    ids, mask, labels = batch
    torch.manual_seed(2)
    with connect(checkpoint, swarm, mode) as model:
        prompts = model.tuning.prompts.detach().clone().requires_grad_(True)
        deep = None if model.tuning.deep is None else model.tuning.deep.detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
        ref_opt = torch.optim.AdamW([prompts] + ([deep] if deep is not None else []), lr=0.05)
        ours, theirs = [], []
        for _ in range(STEPS):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            ours.append(loss.item())
            ref_opt.zero_grad()
            ref_loss = reference_loss(reference, ids, mask, labels, prompts, deep)
            ref_loss.backward()
            ref_opt.step()
            theirs.append(ref_loss.item())
        state = model.prompt_state()
        with torch.no_grad():
            trained = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    with connect(checkpoint, swarm, mode) as fresh:  # trained prompts saved and loaded into another client
        fresh.load_prompt_state(state)
        with torch.no_grad():
            assert fresh(input_ids=ids, attention_mask=mask, labels=labels).loss.item() == trained.item()
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"{mode}: loss {ours[0]:.4f} -> {ours[-1]:.4f}; max per-step diff {max(diffs):.2e}")
    assert ours[-1] < ours[0] - 0.1  # it learns
    assert max(diffs) <= 1e-4, diffs


def test_prompts_longer_than_the_sequence_are_refused(checkpoint, swarm):
    from biopetals.client.remote_forward import remote_blocks

    with connect(checkpoint, swarm, "ptune") as model:
        hidden = torch.zeros(1, 2, 64)
        with pytest.raises(ValueError, match="3 prompt positions for 2 tokens"):
            remote_blocks(model.swarm, hidden, None, torch.zeros(8, 1, 3, 64))


def test_generate_without_cache_uses_the_prompts(checkpoint, swarm, reference):
    """generate(use_cache=False) recomputes statelessly with the prompts: transformers' greedy tokens
    with the same prompts inserted (prompts that change the output, so ignoring them would fail)."""
    ids = AutoTokenizer.from_pretrained(checkpoint)("DNA is", return_tensors="pt").input_ids
    with connect(checkpoint, swarm, "deep_ptune") as model:
        randomize_prompts(model, 6)
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        x = ids
        with torch.no_grad():
            for _ in range(6):
                logits = with_prompts(reference, x, None, model.tuning.prompts, model.tuning.deep).logits
                x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            plain = reference.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(out, x)
    assert not torch.equal(out, plain)


def randomize_prompts(model, seed):
    """Prompts large enough to change every output (deep ones start at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        model.tuning.prompts.normal_(0, 1.0)
        model.tuning.deep.normal_(0, 1.0)


def decode(model, session, ids, steps, after_step=lambda i: None):
    """Greedy decoding through ``session`` with ``model.inference_step``: (tokens, last logits per step)."""
    tokens, new, logits = ids, ids, []
    for i in range(steps):
        logits.append(model.inference_step(session, new)[:, -1])
        new = logits[-1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, new], dim=1)
        after_step(i)
    return tokens, logits


def check_decoding(reference, model, ids, tokens, logits):
    """Each step's logits are transformers' on the whole sequence so far with the same prompts."""
    with torch.no_grad():
        for i, ours in enumerate(logits):
            ref = with_prompts(reference, tokens[:, :ids.shape[1] + i], None, model.tuning.prompts,
                               model.tuning.deep).logits[:, -1]
            assert (ref - ours).abs().max().item() <= 1e-4, i
            assert int(ref.argmax()) == int(tokens[0, ids.shape[1] + i])


def test_inference_session_carries_the_prompts(checkpoint, swarm, reference):
    """Greedy decoding with KV caches on the nodes (deep prompts sent with the first step, spec §5.3)
    gives the tokens and logits of transformers recomputing the whole sequence with the same prompts."""
    ids = AutoTokenizer.from_pretrained(checkpoint)("Enzymes lower", return_tensors="pt").input_ids
    with connect(checkpoint, swarm, "deep_ptune") as model:
        randomize_prompts(model, 7)
        with model.inference_session(max_length=32) as session:
            tokens, logits = decode(model, session, ids, 6)
        check_decoding(reference, model, ids, tokens, logits)


def test_a_stalled_then_a_killed_node_are_replaced_and_decoding_goes_on(checkpoint, reference):
    """The asyncio drivers wired to the chain state (client/chain.py, whose rules tests/test_client_chain.py
    checks with a fake clock, a replacement split over several nodes included), on real node processes.
    The node serving blocks 3:8 stops (SIGSTOP: alive, silent): its pushed result is late, it is asked
    directly, misses its deadline, is avoided and replaced, its history replayed with the deep prompts;
    then the replacement is killed (its stream closes) and replaced in turn. Every step's logits are
    transformers'. Every route has one possible shape (blocks 0:3, then one node for 3:8), so no
    route depends on round trips measured on a busy machine."""
    ids = AutoTokenizer.from_pretrained(checkpoint)("Ribosomes read", return_tensors="pt").input_ids
    floor = 3.0
    with LocalSwarm(checkpoint, [(0, 3), (3, 8), (3, 8)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32",
            tuning_mode="deep_ptune", pre_seq_len=P, step_timeout_floor=floor, stall_ban=120.0)
        randomize_prompts(model, 8)
        stalled, killed, took = [], [], {}

        def node_of_blocks_3_to_8():
            peer = next(p for p, start, end in session.route[0] if (start, end) == (3, 8))
            return next(n for n in swarm.nodes if n.peer_id == peer)

        def fail_nodes(i):  # after two steps: a cold node's first steps may be slow on a busy machine
            now = time.monotonic()
            if i == 2:
                stalled.append(node_of_blocks_3_to_8())
                os.kill(stalled[0].process.pid, signal.SIGSTOP)
                took["stall"] = time.monotonic()
            elif i == 3:  # the step that found the stall
                took["stall"] = now - took["stall"]
                assert model.swarm.health.banned_until(stalled[0].peer_id, now) > now + 60  # stall_ban
            elif i == 4:
                swarm.add_node(3, 8)
                killed.append(node_of_blocks_3_to_8())
                killed[0].kill()
                took["kill"] = time.monotonic()
            elif i == 5:  # the step that found the kill
                took["kill"] = now - took["kill"]

        try:
            with model.inference_session(max_length=32) as session:
                tokens, logits = decode(model, session, ids, 7, fail_nodes)
                route = session.route[0]
                assert session.failovers == 2
            check_decoding(reference, model, ids, tokens, logits)
        finally:
            for node in stalled:  # a stopped process still holds its sockets: continue it, then stop it
                os.kill(node.process.pid, signal.SIGCONT)
            model.close()
    assert [(start, end) for _, start, end in route] == [(0, 3), (3, 8)], route
    assert {stalled[0].peer_id, killed[0].peer_id}.isdisjoint(p for p, _, _ in route)
    # the stall: two missed deadlines (pushed, then asked directly) and a replay; the kill: a replay.
    # Both far below the 60 s step_timeout ceiling (the bounds leave room for a loaded 2-core machine:
    # a kill once took 10.06 s to replace there; what is checked is that nobody waits for the ceiling).
    assert took["stall"] < 2 * floor + 20 and took["kill"] < 30, took


def lora():
    return LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"], lora_dropout=0.0)


def test_lora_on_client_modules_trains_like_transformers(checkpoint, swarm, tmp_path):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.padding_side = "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    base = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32")
    with base:
        torch.manual_seed(5)
        ours = get_peft_model(base, lora())
        ref = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), lora())
        loaded = ref.load_state_dict(ours.state_dict(), strict=False)  # the same LoRA init
        assert not loaded.unexpected_keys  # every client-side name exists in the full model
        # only LoRA tensors train, on both sides
        names = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
        assert names == sorted(n for n, p in ref.named_parameters() if p.requires_grad), names
        assert len(names) == 4 and all("lora_" in n for n in names)
        opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.01)
        ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=0.01)
        losses, ref_losses = [], []
        for step in range(10):
            for model, o, out in ((ours, opt, losses), (ref, ref_opt, ref_losses)):
                o.zero_grad()
                loss = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels).loss
                loss.backward()
                out.append(loss.item())
            if step == 1:  # after one step both LoRA factors have gradients
                theirs = dict(ref.named_parameters())
                for name, p in ours.named_parameters():
                    if p.requires_grad:
                        assert theirs[name].grad.abs().max() > 0, name
                        assert relative_error(p.grad, theirs[name].grad) <= 1e-5, name
            opt.step()
            ref_opt.step()
        assert max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-4, (losses, ref_losses)
        assert losses[-1] < losses[0]
        # saved with peft and loaded onto a fresh distributed model: the same outputs
        ours.save_pretrained(tmp_path / "lora")
        with torch.no_grad():
            trained = ours(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        with AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32") as fresh:
            with torch.no_grad():
                loaded = PeftModel.from_pretrained(fresh, tmp_path / "lora")(
                    input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        assert torch.equal(trained, loaded)
        # the blocks are remote: LoRA on their modules is refused by peft
        with pytest.raises(ValueError, match="q_proj"):
            get_peft_model(base, LoraConfig(target_modules=["q_proj"]))
