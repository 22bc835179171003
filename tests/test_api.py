"""biopetals-api against a real local swarm, through the official ``openai`` client.

A tiny random Llama checkpoint (with a chat template) is served by three ``biopetals-node``
processes; ``biopetals-api`` runs as its own process with an API-key file, ``--codec f32``
(lossless activations) and ``--max-sessions 2``. The reference for every greedy answer is
transformers' own model on the same checkpoint. The last tests break the swarm on purpose
(a node killed mid-answer, then no node left for some blocks, then an unreachable swarm):
errors a user understands.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from support_api import APIServer, api_workdir, chat_checkpoint, write_api_keys  # noqa: F401  (fixtures)
from support_swarm import RawClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from biopetals.client.local_swarm import LocalSwarm
from biopetals.protocol.messages import NodeInfo, NodeInfoRequest
from biopetals.transport.keyfiles import load_swarm_key

pytestmark = [pytest.mark.timeout(600)]

KEY = "test-key-0123456789abcdef"
MODEL = "tiny"
QUESTION = [{"role": "user", "content": "What do ribosomes do?"}]


@pytest.fixture(scope="module")
def workdir(api_workdir):
    return api_workdir


@pytest.fixture(scope="module")
def checkpoint(chat_checkpoint):
    return chat_checkpoint


@pytest.fixture(scope="module")
def tok(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def swarm(checkpoint):
    with LocalSwarm(checkpoint, [(0, 3), (3, 6), (6, 8)]) as s:
        yield s


@pytest.fixture(scope="module")
def server(checkpoint, swarm, workdir):
    keys = write_api_keys(workdir / "api.keys", KEY, "second-key-abcdefghijklmnop")
    # --prompt-lookup 4: every greedy answer below goes through speculative decoding, and must not change
    with APIServer(checkpoint, swarm, "--codec", "f32", "--max-sessions", "2", "--api-keys", str(keys),
                   "--prompt-lookup", "4", log_dir=workdir) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client(KEY)


def greedy(reference, tok, ids, n):
    """transformers' greedy tokens (new ones only) and their text."""
    with torch.no_grad():
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new, tok.decode(new, skip_special_tokens=True)


def chat_ids(tok, messages=QUESTION):
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)["input_ids"]


@pytest.mark.exactness
def test_chat_greedy_equals_transformers_with_usage(client, reference, tok):
    ids = chat_ids(tok)
    new, text = greedy(reference, tok, ids, 24)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if len(new) == 24 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ids.shape[1], len(new))
    assert r.usage.total_tokens == ids.shape[1] + len(new)
    extra = r.model_extra["biopetals"]
    assert [(s["start"], s["end"]) for s in extra["route"]] == [(0, 3), (3, 6), (6, 8)]
    assert extra["tokens_per_second"] > 0


@pytest.mark.exactness
def test_chat_streaming_equals_transformers(client, reference, tok):
    ids = chat_ids(tok)
    new, text = greedy(reference, tok, ids, 24)
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for p in pieces if p) >= 2  # streamed, not one lump
    assert "".join(pieces) == text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length" if len(new) == 24 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(new)
    assert chunks[-1].usage.prompt_tokens == ids.shape[1]


@pytest.mark.exactness
def test_completions_greedy_equals_transformers(client, reference, tok):
    prompt = "The mitochondria is the powerhouse"
    ids = tok(prompt, return_tensors="pt").input_ids
    new, text = greedy(reference, tok, ids, 16)
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=16)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(new)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=16, stream=True) if c.choices)
    assert streamed == text


def test_stop_sequences_and_max_tokens(client, reference, tok):
    ids = chat_ids(tok)
    _, text = greedy(reference, tok, ids, 40)
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=5, extra_body={"min_tokens": 5})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # a stop sequence from the middle of the greedy answer: the answer ends just before it
    stop = text.strip()[len(text.strip()) // 2:][:3]
    assert len(stop) == 3, text
    cut = text[:text.find(stop)]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=40, stop=stop, stream=True) if c.choices)
    assert streamed == cut


@pytest.mark.exactness
def test_prompt_lookup_leaves_answers_unchanged(client, reference, tok):
    """The server's prompt lookup (greedy requests, ``--prompt-lookup 4`` here) and a request's own
    ``prompt_lookup`` give exactly the answer without it (0), transformers' greedy one, stop and
    usage included, on a prompt whose answer the lookup drafts from (README "Speculative decoding")."""
    prompt = "the cell the cell divides and the cell the cell divides and the cell"
    ids = tok(prompt, return_tensors="pt").input_ids
    new, text = greedy(reference, tok, ids, 32)

    def ask(**extra):
        r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=32, extra_body=extra)
        used = r.model_extra["biopetals"]
        return (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason), used

    plain, used = ask(prompt_lookup=0)
    assert plain[:2] == (text, len(new)) and used["prompt_lookup"] == used["rollbacks"] == 0
    for extra, k in (({}, 4), ({"prompt_lookup": 8}, 8)):
        answer, used = ask(**extra)
        # candidates went through the swarm, rejected ones were rolled back, and nothing changed
        assert answer == plain and used["prompt_lookup"] == k and used["rollbacks"] > 0
    stop = text.strip()[len(text.strip()) // 2:][:3]
    stopped = [client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=32, stop=[stop],
                                         extra_body={"prompt_lookup": k}) for k in (0, 8)]
    assert stopped[0].choices[0].text == stopped[1].choices[0].text == text[:text.find(stop)]
    assert stopped[0].usage.completion_tokens == stopped[1].usage.completion_tokens


def test_seed_reproduces_a_sampled_answer(client):
    def ask(seed, temperature=1.0, top_p=0.9):
        return client.completions.create(model=MODEL, prompt="DNA is", temperature=temperature, top_p=top_p,
                                         seed=seed, max_tokens=16, extra_body={"min_tokens": 16}).choices[0].text

    assert ask(7) == ask(7)
    assert ask(7, 1.5, 1.0) != ask(8, 1.5, 1.0)  # 16 tokens sampled from all of a 320-token vocabulary


@pytest.mark.parametrize("body, status, code", [
    ({"model": "gpt-4", "messages": QUESTION}, 404, "model_not_found"),
    ({"model": MODEL, "messages": QUESTION, "temperature": 3}, 400, "invalid_value"),
    ({"model": MODEL, "messages": QUESTION, "n": 2}, 400, "invalid_value"),
    ({"model": MODEL, "messages": []}, 400, "invalid_value"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 100000}, 400, "context_length_exceeded"),
    ({"model": MODEL, "messages": QUESTION, "max_tokens": 0}, 400, "invalid_value"),
    ({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "unsupported_parameter"),
    ({"model": MODEL, "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
])
def test_bad_requests_get_openai_errors(server, body, status, code):
    raw = post(server, "/v1/chat/completions", body)
    assert raw[0] == status and raw[1]["error"]["code"] == code, raw
    assert raw[1]["error"]["message"]
    c = server.client(KEY)
    expected = openai.NotFoundError if status == 404 else openai.BadRequestError
    with pytest.raises(expected) as info:
        c.chat.completions.create(**body)
    assert info.value.status_code == status


def test_malformed_json_is_a_400(server):
    status, body = post(server, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def post(server, path, body, key=KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.url + path, data=data, headers=headers)
    return _open(req)


def get(server, path, key=KEY):
    req = urllib.request.Request(server.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    return _open(req)


def _open(req):
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get_content_type() == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789abcdef", KEY + "x"])
def test_wrong_or_missing_key_gets_401_and_reveals_nothing(server, key):
    for path in ("/v1/models", "/api/swarm", "/v1/models/" + MODEL):
        status, body = get(server, path, key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert MODEL not in json.dumps(body) and "12D3KooW" not in json.dumps(body)
    status, body = post(server, "/v1/chat/completions", {"model": MODEL, "messages": QUESTION}, key)
    assert status == 401 and MODEL not in json.dumps(body)
    if key is not None:  # the openai client itself refuses to send no key at all
        with pytest.raises(openai.AuthenticationError):
            server.client(key).models.list()
    # the page itself holds no swarm data and loads without a key (it asks for one)
    assert get(server, "/", key)[0] == 200


def test_models_with_either_key(server):
    for key in (KEY, "second-key-abcdefghijklmnop"):
        assert [m.id for m in server.client(key).models.list()] == [MODEL]


def test_binding_beyond_loopback_needs_api_keys(checkpoint, swarm):
    cmd = [sys.executable, "-m", "biopetals.api.cli", "--model", str(checkpoint), "--swarm-key", str(swarm.key_path),
           "--initial-peers", *swarm.initial_peers, "--host", "0.0.0.0", "--port", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--api-keys" in r.stderr and "READY" not in r.stdout


def node_infos(swarm) -> list[NodeInfo]:
    async def go():
        async with RawClient(load_swarm_key(swarm.key_path), timeout=30) as raw:
            infos = await asyncio.gather(*(raw.request(n.addr, NodeInfoRequest()) for n in swarm.nodes))
        assert all(isinstance(i, NodeInfo) for i in infos)
        return infos

    return asyncio.run(go())


def node_sessions(swarm) -> list[int]:
    return [i.sessions_open for i in node_infos(swarm)]


def wait_sessions(swarm, expected: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        seen = node_sessions(swarm)
        if all(s == expected for s in seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.2)


@pytest.mark.exactness
def test_concurrent_streams_bounded_and_disconnect_frees_sessions(server, swarm, reference, tok):
    """Two streams run at once (one session each on every node), a third request gets 429; closing
    the streams mid-answer closes their sessions on the nodes, and the slots serve again."""
    c = server.client(KEY)
    long = dict(model=MODEL, temperature=0, max_tokens=1800, stream=True, extra_body={"min_tokens": 1800})
    a = c.chat.completions.create(messages=QUESTION, **long)
    b = c.completions.create(prompt="Enzymes lower", **long)
    ia, ib = iter(a), iter(b)
    next(ia), next(ib)  # role chunk / first text: both are generating now
    first_a = next(ia).choices[0].delta.content
    first_b = next(ib).choices[0].text
    assert first_a is not None and first_b is not None
    assert wait_sessions(swarm, 2) == [2, 2, 2]
    with pytest.raises(openai.RateLimitError) as info:
        c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert info.value.status_code == 429 and "at most 2" in str(info.value)
    steps = [i.decode_steps for i in node_infos(swarm)]
    a.close()
    b.close()
    assert wait_sessions(swarm, 0) == [0, 0, 0]
    done = [i.decode_steps - s for i, s in zip(node_infos(swarm), steps)]
    assert all(d < 2 * 1000 for d in done), done  # both stopped long before their 1800 tokens
    # both slots serve again, concurrently, with exact greedy answers
    results = {}

    def ask(name, messages):
        results[name] = c.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                  max_tokens=20).choices[0].message.content

    other = [{"role": "user", "content": "Photosynthesis turns light into"}]
    threads = [threading.Thread(target=ask, args=(n, m)) for n, m in (("q", QUESTION), ("o", other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {"q": greedy(reference, tok, chat_ids(tok), 20)[1],
                       "o": greedy(reference, tok, chat_ids(tok, other), 20)[1]}


def test_non_streaming_client_disconnect_frees_sessions(server, swarm):
    """A client that gives up on a non-streaming answer: its generation stops early, its sessions close."""
    steps = [i.decode_steps for i in node_infos(swarm)]
    c = server.client(KEY, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        c.completions.create(model=MODEL, prompt="DNA", temperature=0, max_tokens=1800, extra_body={"min_tokens": 1800})
    assert wait_sessions(swarm, 0) == [0, 0, 0]
    done = [i.decode_steps - s for i, s in zip(node_infos(swarm), steps)]
    assert all(0 < d < 1000 for d in done), done  # stopped long before its 1800 tokens


def test_web_page_chat_and_swarm_view_in_a_real_browser(server, swarm, reference, tok, workdir):
    """Headless Chromium: the page asks for the API key, shows every block with the 3 real nodes,
    and a question gets a streamed answer equal to transformers' greedy one, with its route."""
    from support_browser import browser_page

    with browser_page() as page:
        page.goto(server.url + "/")
        page.wait_for_selector("#key-form:not([hidden])", timeout=30_000)  # 401: the page asks for a key
        assert not page.is_visible("#key-error")  # no key sent yet: nothing was refused
        page.fill("#key-input", "wrong-key-0123456789abcdef")
        page.click("#key-form button")
        page.wait_for_selector("#key-error:not([hidden])", timeout=30_000)  # a visible 401
        assert "refused (HTTP 401)" in page.text_content("#key-error")
        page.fill("#key-input", KEY)
        page.click("#key-form button")
        page.wait_for_function("document.querySelector('#model-name').textContent.includes('tiny')",
                               timeout=30_000)
        page.wait_for_function("document.querySelectorAll('#nodes tbody tr').length === 3", timeout=30_000)
        counts = page.eval_on_selector_all("#blocks td.count", "tds => tds.map(td => td.textContent)")
        assert counts == ["1"] * 8
        assert page.query_selector("#missing") is None
        peers = page.eval_on_selector_all("#nodes tbody tr td:first-child", "tds => tds.map(td => td.title)")
        assert sorted(peers) == sorted(n.peer_id for n in swarm.nodes)
        names = page.eval_on_selector_all("#nodes tbody tr td:first-child", "tds => tds.map(td => td.textContent)")
        assert sorted(names) == ["local-0", "local-1", "local-2"]  # LocalSwarm's --public-name
        blocks = page.eval_on_selector_all("#nodes tbody tr td:nth-child(2)", "tds => tds.map(td => td.textContent)")
        assert sorted(blocks) == ["0:3", "3:6", "6:8"]
        # count how often the answer's text changes while it streams
        page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.querySelector('#messages'), {subtree: true, characterData: true, childList: true}); }""")
        page.fill("#max-tokens", "24")
        page.fill("#prompt", QUESTION[0]["content"])
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant .meta", timeout=120_000)
        answer = page.text_content(".msg.assistant span")
        meta = page.text_content(".msg.assistant .meta")
        updates = page.evaluate("window.updates")
        note = page.text_content(".msg.assistant .note") if page.query_selector(".msg.assistant .note") else None
        # tokens/s now: measured for every node (decode steps between two views), never a dash
        page.wait_for_timeout(2500)
        tps = page.eval_on_selector_all("#nodes tbody tr td.tps", "tds => tds.map(td => td.textContent)")
        path = workdir / "page.png"
        page.screenshot(path=str(path), full_page=True)
    finish = server.client(KEY).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                        max_tokens=24).choices[0].finish_reason
    assert (note is not None) == (finish == "length"), (note, finish)
    if note is not None:
        assert note.startswith("(stopped at max tokens: 24")
    assert len(tps) == 3 and all(re.fullmatch(r"\d+\.\d", t) for t in tps), tps
    with browser_page(width=420, height=900) as narrow:  # a phone: nothing wider than the screen
        narrow.goto(server.url + "/")
        narrow.wait_for_selector("#key-form:not([hidden])", timeout=30_000)
        narrow.fill("#key-input", KEY)
        narrow.click("#key-form button")
        narrow.wait_for_function("document.querySelectorAll('#nodes tbody tr').length === 3", timeout=30_000)
        width = narrow.evaluate("document.documentElement.scrollWidth")
        narrow.screenshot(path=str(workdir / "page-420.png"), full_page=True)
    assert width <= 420, f"the page is {width} px wide at 420 px"
    assert answer == greedy(reference, tok, chat_ids(tok), 24)[1]
    assert "tokens/s" in meta and meta.count("blocks ") == 3, meta
    assert updates >= 4, updates
    if os.environ.get("BIOPETALS_PAGE_SCREENSHOT"):
        shutil.copy(path, os.environ["BIOPETALS_PAGE_SCREENSHOT"])


def node_of(swarm, peer_id):
    return next(n for n in swarm.nodes if n.peer_id == peer_id)


def route_of(server):
    """The route of a short greedy answer (which node serves block 3 now)."""
    r = server.client(KEY).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=2)
    return {s["start"]: s["peer_id"] for s in r.model_extra["biopetals"]["route"]}


# ----------------------------------------------------------------------------- failures (last: they kill nodes)


@pytest.mark.exactness
def test_a_node_killed_mid_answer_is_replaced_and_the_answer_goes_on(server, swarm, reference, tok):
    """kill -9 the node serving blocks 3:6 mid-answer: a spare takes over, the answer goes on, exact."""
    ids = chat_ids(tok)
    with torch.no_grad():
        ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60, min_new_tokens=60,
                                 do_sample=False)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    swarm.add_node(3, 6)  # the spare
    victim = node_of(swarm, route_of(server)[3])
    stream = server.client(KEY).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=60,
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
    """No node left for blocks 3:6: the stream ends with an error chunk, then 503, and the view says so."""
    survivor = node_of(swarm, route_of(server)[3])
    stream = server.client(KEY).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=1800,
                                                     stream=True, extra_body={"min_tokens": 1800})
    got = []
    with pytest.raises(openai.APIError) as info:
        for i, chunk in enumerate(stream):
            got.append(chunk)
            if i == 5:
                survivor.stop()
    assert 5 < len(got) < 1800
    message = str(info.value)
    print(message)
    assert message.startswith(f"the answer stopped after {len(got) - 1} tokens: the swarm failed to answer")
    assert "blocks 3:6" in message
    with pytest.raises(openai.InternalServerError) as info:
        server.client(KEY).chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    print(info.value)
    assert info.value.status_code == 503
    assert "blocks 0:8" in str(info.value) or "3:6" in str(info.value)
    status, view = get(server, "/api/swarm")
    assert status == 200
    assert view["missing"] == [[3, 6]] and view["online_per_block"] == [1, 1, 1, 0, 0, 0, 1, 1]
    states = {n["peer_id"]: n["state"] for n in view["nodes"]}
    assert states.get(survivor.peer_id) != "ONLINE"  # it said goodbye (OFFLINE) or is gone from the DHT
    assert "UNREACHABLE" in states.values()  # the node killed by the test before: its announcement lingers


def test_unreachable_swarm_is_a_503_that_says_so(checkpoint, workdir):
    """A server whose initial peers cannot be reached starts, and answers 503 saying what to check."""
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
