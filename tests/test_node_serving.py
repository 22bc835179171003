"""A real node process, reached through the real transport: correctness, push, fine-tuning, concurrency.

Numbers are compared with transformers' own ``LlamaForCausalLM`` run locally on the
same checkpoint (tests/support_models.py): the hidden states entering block
``start`` are fed to the node, and its outputs must equal the local model's
outputs of block ``end - 1``. Node processes are shared by the module (start-up
costs seconds); each test opens its own sessions.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from support_models import make_tiny_checkpoint
from support_swarm import RawClient, Swarm

from biopetals.models.config import model_info
from biopetals.models.transformers_contract import cache_keyword_of
from biopetals.protocol.messages import (
    Backward,
    BackwardResult,
    CloseSession,
    Forward,
    ForwardResult,
    Hop,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
    encode_message,
)

PROMPT = 5
DECODE = 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", with_tokenizer=False)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, checkpoint):
    """Node A serves blocks 0:4, node B 4:8, in one swarm."""
    with Swarm(tmp_path_factory.mktemp("swarm")) as swarm:
        a = swarm.start_node(checkpoint, "0:4", "--max-cache-tokens", "4096", "--max-session-tokens", "1024")
        b = swarm.start_node(checkpoint, "4:8")
        yield swarm, a, b


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' model: hidden states entering every block and leaving every block."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (1, PROMPT + DECODE))
    outputs = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: outputs.__setitem__(i, (out[0] if isinstance(out, tuple) else out).detach()))
        for i, layer in enumerate(model.model.layers)
    ]
    with torch.no_grad():
        res = model(ids, output_hidden_states=True)
    for h in hooks:
        h.remove()
    return model, res.hidden_states, outputs


def name(checkpoint) -> str:
    return model_info(checkpoint).dht_prefix


def run(coro):
    return asyncio.run(coro)


def test_node_info(two_nodes, checkpoint):
    swarm, a, _ = two_nodes

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            return await client.request(a.addr, NodeInfoRequest())

    info = run(go())
    assert isinstance(info, NodeInfo)
    assert (info.model, info.start, info.end, info.dtype, info.quant) == (name(checkpoint), 0, 4, "float32", "none")
    assert info.hidden_size == 64 and info.cache_tokens_left == 4096
    assert info.inference_tps > 0 and info.forward_tps > 0
    assert info.sessions_open is not None and info.decode_steps is not None and info.batched_steps is not None
    assert info.batched_steps <= info.decode_steps and info.uptime is not None and info.uptime > 0


def test_swarm_status_command(two_nodes, checkpoint):
    """``biopetals-swarm`` lists both nodes from the DHT, asks each for NodeInfo, sees every block served."""
    swarm, a, b = two_nodes
    base = [sys.executable, "-m", "biopetals.client.status", "--model", str(checkpoint),
            "--swarm-key", str(swarm.key_path), "--initial-peers", a.addr]
    done = subprocess.run(base + ["--node-info", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["model"] == name(checkpoint) and status["blocks"] == 8 and status["missing"] == []
    assert status["online_per_block"] == [1] * 8
    nodes = {n["peer_id"]: n for n in status["nodes"]}
    tps = [nodes[a.peer_id]["inference_tps"]] * 4 + [nodes[b.peer_id]["inference_tps"]] * 4
    assert status["throughput_per_block"] == tps and min(tps) > 0
    assert (nodes[a.peer_id]["start"], nodes[a.peer_id]["end"], nodes[b.peer_id]["start"], nodes[b.peer_id]["end"]) == (0, 4, 4, 8)
    for peer in (a.peer_id, b.peer_id):
        assert nodes[peer]["state"] == "ONLINE" and nodes[peer]["addrs"]
        info = nodes[peer]["node_info"]
        assert info["uptime"] > 0 and info["sessions_open"] >= 0 and 0 <= info["batched_steps"] <= info["decode_steps"]
    text = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert a.peer_id in text.stdout and b.peer_id in text.stdout and "all 8 blocks served" in text.stdout
    assert "coverage per block" in text.stdout and f"bottleneck {min(tps):.1f} tokens/s" in text.stdout
    assert re.search(r"0:4 +# +1 node, ", text.stdout) and re.search(r"4:8 +# +1 node, ", text.stdout), text.stdout


def test_swarm_status_coverage_per_block():
    from biopetals.client.swarm_status import NodeStatus, SwarmStatus, format_text
    from biopetals.protocol.announcement import Announcement, State

    def ann(start, end, tps, state=State.ONLINE):
        return Announcement(state=state, start=start, end=end, inference_tps=tps, forward_tps=tps,
                            cache_tokens_left=1, dtype="float32", quant="none", version="v")

    status = SwarmStatus("m", 10, (NodeStatus("a", ann(0, 6, 2.0)), NodeStatus("b", ann(4, 8, 3.0)),
                                   NodeStatus("c", ann(0, 10, 9.0, State.JOINING))))
    assert status.throughput_per_block() == [2.0] * 4 + [5.0] * 2 + [3.0] * 2 + [0.0] * 2
    assert status.coverage_runs() == [(0, 4, 1, 2.0), (4, 6, 2, 5.0), (6, 8, 1, 3.0), (8, 10, 0, 0.0)]
    text = format_text(status)
    assert re.search(r"4:6 +## +2 nodes, 5.0 tokens/s", text) and re.search(r"8:10 +- +0 nodes", text), text
    assert "NOT SERVED: blocks 8:10" in text


def test_swarm_status_command_says_when_no_peer_answers(checkpoint, tmp_path):
    from biopetals.protocol.identity import Identity
    from biopetals.protocol.swarm_key import SwarmKey
    from biopetals.transport.keyfiles import write_swarm_key

    write_swarm_key(tmp_path / "lab.key", SwarmKey.generate())
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "biopetals.client.status", "--model", str(checkpoint), "--swarm-key", str(tmp_path / "lab.key"),
         "--initial-peers", f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}", "--timeout", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "biopetals-swarm: [CONNECTION_CLOSED] cannot join the swarm: no initial peer accepted us" in done.stderr
    assert f"/ip4/127.0.0.1/tcp/{port}" in done.stderr and "is unreachable" in done.stderr


async def _session_steps(client, addr, model, start, end, inputs, codec="f32"):
    """Prefill PROMPT tokens then one token per step; returns the concatenated outputs."""
    stream, opened = await client.open_session(
        addr, OpenSession(model=model, start=start, end=end, max_length=PROMPT + DECODE, batch_size=1, codec=codec)
    )
    assert isinstance(opened, SessionOpened), opened
    sid = opened.session_id
    outs = []
    chunks = [(0, PROMPT)] + [(p, p + 1) for p in range(PROMPT, PROMPT + DECODE)]
    for step_id, (lo, hi) in enumerate(chunks):
        reply = await client.exchange(stream, Step(session_id=sid, step_id=step_id, position=lo, hidden=inputs[:, lo:hi]), codec)
        assert isinstance(reply, StepResult), reply
        assert reply.step_id == step_id
        outs.append(reply.hidden.float())
    closed = await client.exchange(stream, CloseSession(session_id=sid))
    assert isinstance(closed, SessionClosed)
    return torch.cat(outs, dim=1)


@pytest.mark.exactness
def test_inference_fp32_matches_transformers(two_nodes, reference, checkpoint, capsys):
    swarm, a, _ = two_nodes
    _, hidden_states, outputs = reference

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            return await _session_steps(client, a.addr, name(checkpoint), 0, 4, hidden_states[0])

    got = run(go())
    diff = (got - outputs[3]).abs().max().item()
    with capsys.disabled():
        print(f"\nnode fp32 vs transformers, prefill {PROMPT} + {DECODE} decode steps: max abs diff {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.exactness
def test_push_between_two_nodes(two_nodes, reference, checkpoint):
    """Client -> A (blocks 0:4) -> push -> B (4:8): B's StepResult reaches the client on B's stream."""
    swarm, a, b = two_nodes
    _, hidden_states, outputs = reference
    model = name(checkpoint)

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            sa, oa = await client.open_session(a.addr, OpenSession(model=model, start=0, end=4, max_length=PROMPT + DECODE, batch_size=1, codec="f32"))
            sb, ob = await client.open_session(b.addr, OpenSession(model=model, start=4, end=8, max_length=PROMPT + DECODE, batch_size=1, codec="f32",
                                                                   upstream=a.peer_id))  # A pushes into B's session (§5.10)
            hop = Hop(peer_id=b.peer_id, session_id=ob.session_id, start=4, end=8, addrs=(b.addr.rsplit("/p2p/", 1)[0],))
            outs_a, outs_b = [], []
            chunks = [(0, PROMPT)] + [(p, p + 1) for p in range(PROMPT, PROMPT + 4)]
            for step_id, (lo, hi) in enumerate(chunks):
                step = Step(session_id=oa.session_id, step_id=step_id, position=lo, hidden=hidden_states[0][:, lo:hi], next=(hop,))
                await sa.send(encode_message(step, "f32"))
                ra = await client.receive(sa)
                rb = await client.receive(sb)
                assert isinstance(ra, StepResult) and isinstance(rb, StepResult), (ra, rb)
                assert ra.step_id == rb.step_id == step_id
                outs_a.append(ra.hidden)
                outs_b.append(rb.hidden)
            return torch.cat(outs_a, 1), torch.cat(outs_b, 1), hi

    out_a, out_b, n = run(go())
    assert (out_a - outputs[3][:, :n]).abs().max().item() <= 1e-5
    assert (out_b - outputs[7][:, :n]).abs().max().item() <= 1e-5


@pytest.mark.exactness
def test_forward_backward_match_autograd(two_nodes, reference, checkpoint):
    """Stateless forward/backward over blocks 1:3 with deep prompts, against autograd through the local layers."""
    swarm, a, _ = two_nodes
    model, hidden_states, _ = reference
    torch.manual_seed(2)
    x = hidden_states[1][:, :8].clone()
    prompts = 0.1 * torch.randn(2, 1, 3, 64)
    grad_out = torch.randn(1, 8, 64)

    # Reference: transformers' own layers 1 and 2, prompts added before each (petals' deep prompts).
    xr = x.clone().requires_grad_(True)
    pr = prompts.clone().requires_grad_(True)
    pos = torch.arange(8).unsqueeze(0)
    emb = model.model.rotary_emb(xr, pos)
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(config=model.config, inputs_embeds=xr, attention_mask=None, position_ids=pos,
                              **{cache_keyword_of(create_causal_mask): None})
    h = xr
    for j, layer in enumerate(model.model.layers[1:3]):
        h = torch.cat([h[:, :3] + pr[j], h[:, 3:]], dim=1)
        h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
        h = h[0] if isinstance(h, tuple) else h
    ref_out = h.detach()
    ref_gx, ref_gp = torch.autograd.grad(h, (xr, pr), grad_out)

    async def go():
        async with RawClient(swarm.swarm_key) as client:
            f = await client.request(a.addr, Forward(model=name(checkpoint), start=1, end=3, codec="f32", hidden=x, prompts=prompts), "f32")
            b = await client.request(
                a.addr,
                Backward(model=name(checkpoint), start=1, end=3, codec="f32", hidden=x, grad_outputs=grad_out, prompts=prompts),
                "f32",
            )
            return f, b

    f, b = run(go())
    assert isinstance(f, ForwardResult) and isinstance(b, BackwardResult), (f, b)
    assert (f.hidden - ref_out).abs().max().item() <= 1e-5
    assert (b.grad_inputs - ref_gx).abs().max().item() <= 1e-5
    assert b.grad_prompts is not None and b.grad_prompts.shape == prompts.shape
    assert (b.grad_prompts - ref_gp).abs().max().item() <= 1e-5


def test_32_concurrent_sessions_make_progress(two_nodes, reference, checkpoint):
    swarm, a, _ = two_nodes
    _, hidden_states, outputs = reference
    model = name(checkpoint)
    steps = 4

    async def one(client, k):
        stream, opened = await client.open_session(a.addr, OpenSession(model=model, start=0, end=4, max_length=16, batch_size=1, codec="f32"))
        assert isinstance(opened, SessionOpened), opened
        outs = []
        for i in range(steps):
            r = await client.exchange(stream, Step(session_id=opened.session_id, step_id=i, position=i, hidden=hidden_states[0][:, i : i + 1]), "f32")
            assert isinstance(r, StepResult), r
            outs.append(r.hidden)
        await client.exchange(stream, CloseSession(session_id=opened.session_id))
        return torch.cat(outs, 1)

    async def go():
        async with RawClient(swarm.swarm_key, timeout=120) as client:
            return await asyncio.gather(*(one(client, k) for k in range(32)))

    results = run(go())
    assert len(results) == 32
    for out in results:
        assert (out - outputs[3][:, :steps]).abs().max().item() <= 1e-5


@pytest.mark.exactness
def test_concurrent_decode_steps_are_batched_and_exact(tmp_path, reference, checkpoint):
    """12 sessions with caches of different lengths decode at once on a fresh node: their
    steps share batched calls (the node prints its batching counters when it stops) and
    every session still equals transformers within 1e-5 (node/backend.py, batching)."""
    _, hidden_states, outputs = reference
    model = name(checkpoint)
    total = PROMPT + DECODE
    inputs = hidden_states[0]

    async def one(client, addr, k):
        prefill = 1 + k % 5  # ragged caches: each session is at a different length
        stream, opened = await client.open_session(addr, OpenSession(model=model, start=0, end=4, max_length=total, batch_size=1, codec="f32"))
        assert isinstance(opened, SessionOpened), opened
        chunks = [(0, prefill)] + [(p, p + 1) for p in range(prefill, total)]
        outs = []
        for step_id, (lo, hi) in enumerate(chunks):
            r = await client.exchange(stream, Step(session_id=opened.session_id, step_id=step_id, position=lo, hidden=inputs[:, lo:hi]), "f32")
            assert isinstance(r, StepResult), r
            outs.append(r.hidden.float())
        await client.exchange(stream, CloseSession(session_id=opened.session_id))
        return torch.cat(outs, 1)

    with Swarm(tmp_path) as swarm:
        node = swarm.start_node(checkpoint, "0:4")

        async def go():
            async with RawClient(swarm.swarm_key, timeout=120) as client:
                results = await asyncio.gather(*(one(client, node.addr, k) for k in range(12)))
                return results, await client.request(node.addr, NodeInfoRequest())

        results, info = run(go())
        assert node.stop() == 0
        log = node.output()
    for out in results:
        assert (out - outputs[3]).abs().max().item() <= 1e-5
    line = next(l for l in log.splitlines() if l.startswith("batching: "))
    batched = int(line.split("batched: ")[1].split()[0])
    decode = int(line.split("decode steps: ")[1].split(",")[0])
    print(f"\n{line}")
    assert decode >= 12 * (total - 5)
    assert batched > 0, line
    # The same counters, live, in NodeInfo (spec/messages.md §4.2, keys 10-13).
    assert isinstance(info, NodeInfo)
    assert (info.sessions_open, info.decode_steps, info.batched_steps) == (0, decode, batched)
    assert info.uptime is not None and info.uptime > 0
