"""peft's LoRA on the parts the client holds (embeddings, LM head), trained through real node processes.

The same ``LoraConfig`` wraps the distributed model and transformers' own model of the
same tiny checkpoint (their LoRA weights made equal); gradients of every LoRA tensor and
a 10-step AdamW loss curve must agree (f32 activations), and peft's ``save_pretrained`` /
``PeftModel.from_pretrained`` round trip onto a fresh distributed model. LoRA on the blocks' own modules
(``q_proj``, ...) cannot be applied on the client, which does not hold them: peft says so.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from support_finetune import relative_error
from support_models import make_tiny_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm

pytestmark = pytest.mark.timeout(300)

TEXTS = ["The mitochondria is the powerhouse of the cell.", "Photosynthesis turns light into sugar."]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("peft") / "tiny-llama")


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 4), (4, 8)]) as s:
        yield s


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
