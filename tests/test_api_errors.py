"""biopetals-api when the swarm fails: errors a user understands, through the ``openai`` client.

Real node processes on loopback (tiny checkpoint, blocks 3:8 served twice): a node killed
mid-answer is replaced and the answer goes on, equal to transformers' greedy one; when no
node is left for some blocks, the stream ends with an error chunk saying why, a new
request gets 503 naming the blocks, and the swarm view lists them as missing. A server
whose initial peers cannot be reached answers 503 "swarm unreachable".
"""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
import torch
from support_api import APIServer, api_workdir, chat_checkpoint  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client.local_swarm import LocalSwarm

pytestmark = [pytest.mark.timeout(600)]

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "What do ribosomes do?"}]


@pytest.fixture(scope="module")
def workdir(api_workdir):
    return api_workdir


@pytest.fixture(scope="module")
def checkpoint(chat_checkpoint):
    return chat_checkpoint


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 3), (3, 8), (3, 8)]) as s:
        yield s


@pytest.fixture(scope="module")
def server(checkpoint, swarm, workdir):
    with APIServer(checkpoint, swarm, "--codec", "f32", "--step-timeout", "30", log_dir=workdir) as s:
        yield s


def node_of(swarm, peer_id):
    return next(n for n in swarm.nodes if n.peer_id == peer_id)


def route_of(server):
    """The route of a short greedy answer (which node serves 3:8 now)."""
    r = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=2)
    return {s["start"]: s["peer_id"] for s in r.model_extra["biopetals"]["route"]}


@pytest.mark.exactness
def test_a_node_killed_mid_answer_is_replaced_and_the_answer_goes_on(server, swarm, checkpoint):
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60,
                                 do_sample=False)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    victim = node_of(swarm, route_of(server)[3])
    stream = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60,
                                                     stream=True, extra_body={"min_tokens": 60})
    pieces = []
    for i, chunk in enumerate(stream):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if i == 10:
            victim.kill()
        last = chunk
    assert not victim.alive()
    assert "".join(pieces) == expected
    route = {s["start"]: s["peer_id"] for s in last.model_extra["biopetals"]["route"]}
    assert route[3] != victim.peer_id


def test_no_node_left_ends_the_stream_with_an_error_then_503(server, swarm):
    survivor = node_of(swarm, route_of(server)[3])
    stream = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=200,
                                                     stream=True, extra_body={"min_tokens": 200})
    got = []
    with pytest.raises(openai.APIError) as info:
        for i, chunk in enumerate(stream):
            got.append(chunk)
            if i == 5:
                survivor.stop()
    assert 5 < len(got) < 200
    message = str(info.value)
    print(message)
    assert message.startswith(f"the answer stopped after {len(got) - 1} tokens: the swarm failed to answer")
    assert "blocks 3:8" in message
    with pytest.raises(openai.InternalServerError) as info:
        server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    print(info.value)
    assert info.value.status_code == 503
    assert "blocks 0:8" in str(info.value) or "3..7" in str(info.value)
    with urllib.request.urlopen(server.url + "/api/swarm", timeout=60) as r:
        view = json.loads(r.read())
    assert view["missing"] == [[3, 8]] and view["online_per_block"] == [1, 1, 1, 0, 0, 0, 0, 0]
    states = {n["peer_id"]: n["state"] for n in view["nodes"]}
    assert states.get(survivor.peer_id) != "ONLINE"  # it said goodbye (OFFLINE) or is gone from the DHT
    assert "UNREACHABLE" in states.values()  # the node killed by the test before: its announcement lingers


def test_unreachable_swarm_is_a_503_that_says_so(checkpoint, workdir):
    class Dead:
        key_path = workdir / "dead.key"
        initial_peers = ["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWLS2HhQUXGRm76XwttwitnsivSY2jLJoXD8ENR8TMci9k"]

    from biopetals.protocol.swarm_key import SwarmKey
    from biopetals.transport.keyfiles import write_swarm_key

    write_swarm_key(Dead.key_path, SwarmKey.generate())
    with APIServer(checkpoint, Dead, log_dir=workdir) as server:
        with pytest.raises(openai.InternalServerError) as info:
            server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        print(info.value)
        assert info.value.status_code == 503 and "unreachable" in str(info.value)
