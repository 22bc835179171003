"""Server-side LoRA adapters (spec/messages.md §6.3) over real node processes, against transformers + peft.

Two random LoRA adapters (every linear layer of the blocks, non-zero B) are made with
peft on a tiny checkpoint and saved with ``save_pretrained``. Two ``biopetals-node``
processes split the blocks with ``--adapters bio=… other=…``; a third serves all blocks
with no adapter. The reference is ``PeftModel.from_pretrained`` of the same base and
adapter, fp32. Activations travel as f32: greedy tokens through an inference session
must be identical, logits within 1e-4, gradients within 1e-5 relative; a request for an
adapter a node lacks gets ``UNKNOWN_ADAPTER`` and the node keeps serving; a client that
asks for an adapter never routes through the node without it. Also here: other bad
fine-tuning requests (gradients of the wrong shape, prompts longer than the sequence) get
typed errors from the same nodes.
"""

from __future__ import annotations

import asyncio

import msgpack

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from support_finetune import relative_error
from support_models import make_tiny_checkpoint
from support_swarm import RawClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.protocol.envelope import PROTOCOL_VERSION
from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm
from biopetals.models.config import model_info
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.messages import (
    Backward,
    BackwardResult,
    Error,
    Forward,
    ForwardResult,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
)
from biopetals.protocol.tensors import encode_tensor

pytestmark = pytest.mark.timeout(300)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("adapters") / "tiny-llama")


def base(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory):
    """``{name: directory}`` of two random LoRA adapters saved by peft."""
    out = {}
    for seed, (name, rslora) in enumerate((("bio", False), ("other", True))):
        torch.manual_seed(10 + seed)
        config = LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
        path = tmp_path_factory.mktemp(f"lora-{name}")
        get_peft_model(base(checkpoint), config).save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def swarm(checkpoint, adapters):
    args = ["--adapters"] + [f"{name}={path}" for name, path in adapters.items()]
    with LocalSwarm(checkpoint, [(0, 5), (5, 8)], extra_args=args) as s:
        s.extra_args = []
        s.add_node(0, 8)  # a node without adapters: requests with an adapter must avoid it
        yield s


def reference(checkpoint, adapters, name):
    return PeftModel.from_pretrained(base(checkpoint), adapters[name]).eval()


def connect(checkpoint, swarm, adapter):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", adapter=adapter)


def ids_of(checkpoint, text="The mitochondria is the powerhouse of the cell."):
    return AutoTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("name", ["bio", "other"])
def test_forward_and_gradients_equal_peft(checkpoint, adapters, swarm, name):
    ids = ids_of(checkpoint)
    ref = reference(checkpoint, adapters, name)
    with connect(checkpoint, swarm, name) as model:
        emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, labels=ids)
        out.loss.backward()
        emb_ref = ref.get_input_embeddings()(ids).detach().requires_grad_(True)
        ref_out = ref(inputs_embeds=emb_ref, labels=ids)
        ref_out.loss.backward()
        diff = (out.logits - ref_out.logits).abs().max().item()
        print(f"{name}: logits max abs diff {diff:.2e}, grad relative {relative_error(emb.grad, emb_ref.grad):.2e}")
        assert diff <= 1e-4
        assert relative_error(emb.grad, emb_ref.grad) <= 1e-5
        # the adapter matters: the base model's logits are far from these
        with torch.no_grad():
            plain = base(checkpoint)(ids).logits
        assert (plain - ref_out.logits).abs().max().item() > 1e-2


def test_greedy_tokens_in_a_session_equal_peft_generate(checkpoint, adapters, swarm):
    ids = ids_of(checkpoint, "DNA is transcribed into")
    ref = reference(checkpoint, adapters, "bio")
    expected = ref.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                            return_dict_in_generate=True, output_logits=True)
    with connect(checkpoint, swarm, "bio") as model, model.inference_session(max_length=64) as session:
        tokens, logits, new = ids, [], ids
        with torch.no_grad():
            for _ in range(NEW_TOKENS):
                hidden = session.step(model.model.embed_tokens(new))
                logits.append(model.lm_head(model.model.norm(hidden[:, -1:]))[:, -1])
                new = logits[-1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, new], dim=1)
        route = session.route[0]
    assert torch.equal(tokens, expected.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(logits, expected.logits)) <= 1e-4
    plain = swarm.nodes[2].peer_id
    assert all(peer != plain for peer, _, _ in route), route  # never through the node without adapters


def test_unknown_adapter_is_a_typed_error_and_the_node_keeps_serving(checkpoint, swarm):
    node = swarm.nodes[0]
    model_name = model_info(checkpoint).dht_prefix
    from biopetals.transport.keyfiles import load_swarm_key

    async def go():
        async with RawClient(load_swarm_key(swarm.key_path)) as client:
            info = await client.request(node.addr, NodeInfoRequest())
            assert isinstance(info, NodeInfo) and info.adapters == ("bio", "other")
            hidden = torch.randn(1, 3, 64)
            reply = await client.request(node.addr, Forward(model=model_name, start=0, end=5, codec="f32",
                                                            hidden=hidden, adapter="nope"))
            assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_ADAPTER, reply
            _, reply = await client.open_session(node.addr, OpenSession(
                model=model_name, start=0, end=5, max_length=8, batch_size=1, codec="f32", adapter="nope"))
            assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_ADAPTER, reply
            ok = await client.request(node.addr, Forward(model=model_name, start=0, end=5, codec="f32",
                                                         hidden=hidden, adapter="bio"), "f32")
            assert isinstance(ok, ForwardResult) and ok.hidden.shape == hidden.shape
            plain = await client.request(swarm.nodes[2].addr, NodeInfoRequest())
            assert plain.adapters == ()

    asyncio.run(go())
    assert node.alive()


def test_client_asking_for_an_adapter_nobody_serves_finds_no_route(checkpoint, swarm):
    from biopetals.client import MissingBlocksError

    with connect(checkpoint, swarm, "absent") as model:
        with pytest.raises(MissingBlocksError):
            model(ids_of(checkpoint))


def test_announcements_list_the_adapters(checkpoint, swarm):
    """``biopetals-swarm`` reads the announcements: both adapter nodes list them, the third none."""
    import json
    import subprocess
    import sys

    base = [sys.executable, "-m", "biopetals.client.status", "--model", str(checkpoint), "--swarm-key",
            str(swarm.key_path), "--initial-peers", swarm.nodes[0].addr]
    done = subprocess.run(base + ["--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    adapters = {n["peer_id"]: n["adapters"] for n in json.loads(done.stdout)["nodes"]}
    assert adapters == {swarm.nodes[0].peer_id: ["bio", "other"], swarm.nodes[1].peer_id: ["bio", "other"],
                        swarm.nodes[2].peer_id: []}


HIDDEN = 64


def t(*shape):
    return encode_tensor(torch.full(shape, 0.25), "f32")


def backward(model, hidden, grad, prompts=None) -> bytes:
    body = {0: model, 1: 0, 2: 4, 3: "f32", 4: hidden, 5: grad}
    if prompts is not None:
        body[6] = prompts
    return msgpack.packb({0: PROTOCOL_VERSION, 1: 13, 2: body}, use_bin_type=True)


def forward(model, hidden, prompts) -> bytes:
    return msgpack.packb({0: PROTOCOL_VERSION, 1: 11, 2: {0: model, 1: 0, 2: 4, 3: "f32", 4: hidden, 5: prompts}}, use_bin_type=True)


def test_bad_backward_and_prompts_are_typed_errors(checkpoint, swarm):
    """spec/messages.md §6.1-§6.2 cross-field rules: ``grad_outputs`` of another shape than ``hidden``,
    ``prompts`` longer than the sequence, for another number of blocks or another batch:
    ``INVALID_TENSOR`` (bytes built by hand: our constructors refuse such messages). After them,
    a valid ``Backward`` with prompts returns gradients of the right shapes."""
    from biopetals.transport.keyfiles import load_swarm_key

    n, model = swarm.nodes[0], model_info(checkpoint).dht_prefix

    async def go():
        async with RawClient(load_swarm_key(swarm.key_path)) as client:
            for data in (
                backward(model, t(2, 5, HIDDEN), t(2, 4, HIDDEN)),  # grad_outputs of the wrong shape
                backward(model, t(2, 5, HIDDEN), t(1, 5, HIDDEN)),
                backward(model, t(2, 5, HIDDEN), t(2, 5, HIDDEN), t(4, 2, 6, HIDDEN)),  # prompts longer than 5 tokens
                forward(model, t(2, 5, HIDDEN), t(4, 2, 6, HIDDEN)),
                forward(model, t(2, 5, HIDDEN), t(3, 2, 2, HIDDEN)),  # 3 blocks of prompts for a 4-block span
                forward(model, t(2, 5, HIDDEN), t(4, 1, 2, HIDDEN)),  # batch 1 for a batch of 2
            ):
                reply = await client.request_bytes(n.addr, data)
                assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_TENSOR, reply
            ok = await client.request(n.addr, Backward(
                model=model, start=0, end=4, codec="f32", hidden=torch.randn(2, 5, HIDDEN),
                grad_outputs=torch.randn(2, 5, HIDDEN), prompts=torch.randn(4, 2, 3, HIDDEN)), "f32")
            assert isinstance(ok, BackwardResult), ok
            assert ok.grad_inputs.shape == (2, 5, HIDDEN) and ok.grad_prompts.shape == (4, 2, 3, HIDDEN)
            assert ok.grad_prompts.abs().max() > 0

    asyncio.run(go())
    assert n.alive()
