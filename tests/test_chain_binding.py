"""Sessions bound to their chain (spec/messages.md §5.10), on real node processes over loopback.

An insider holds the swarm key and knows the victim's session id, position and step ids
(as any node upstream of the victim does: they travel in ``next``). Each variant of
issue 20 is tried against the session of a live greedy ``generate()``: a ``Push`` at the
victim's position, the same naming the insider as the next hop, ``step_id = 2^64 - 1``,
a wrong position, a push into the first span (which names no upstream), and the victim's
session named on the insider's own session stream. Each is refused with a typed error,
and the victim's tokens still equal transformers' on the same checkpoint, with no
failover; a client of version 1 finds no ``/biopetals/node/1`` to talk to. A failover
in the middle of a chain rebinds the next session (``SetUpstream``): the replacement's
pushes are accepted, the output equals transformers'.
tests/test_node_chain_binding.py holds the same rules as fake-clock unit tests.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from support_models import make_tiny_checkpoint
from support_swarm import RawClient
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.local_swarm import LocalSwarm
from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.envelope import pack_envelope
from biopetals.protocol.messages import (
    CloseSession, Error, Hop, NodeInfoRequest, OpenSession, Push, SessionOpened, SetUpstream, Step,
)
from biopetals.transport.errors import UnknownProtocolError
from biopetals.transport.keyfiles import load_swarm_key

pytestmark = [pytest.mark.timeout(300), pytest.mark.exactness]

U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("chainbind") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def prompt_ids(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)("The mitochondria is the powerhouse", return_tensors="pt").input_ids


def remote_model(checkpoint, swarm):
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="f32", step_timeout=30.0)


async def insider_attacks(swarm, victim, model_name: str, hidden_size: int) -> list[Error]:
    """Every variant of issue 20 against the victim's chain; returns the errors the nodes answered."""
    first, second = (s.handle for s in victim.spans)  # the SpanSession of each ChainSpan
    position, step_id = victim.position, victim.position + 1
    h = torch.full((1, 1, hidden_size), 0.5)
    node = {n.peer_id: n.addr for n in swarm.nodes}
    async with RawClient(load_swarm_key(swarm.key_path), timeout=20.0) as insider:
        own_hop = Hop(peer_id=insider.host.peer_id, session_id=b"insider-session", start=second.end, end=second.end + 1)
        replies = []
        for push in (
            Push(session_id=second.session_id, step_id=step_id, position=position, hidden=h),
            Push(session_id=second.session_id, step_id=step_id, position=position, hidden=h, next=(own_hop,)),
            Push(session_id=second.session_id, step_id=U64_MAX, position=position, hidden=h),
            Push(session_id=second.session_id, step_id=step_id, position=position + 3, hidden=h),
        ):
            replies.append(await insider.request(node[second.peer_id], push))
        # the first span names no upstream: nobody may push into it
        replies.append(await insider.request(node[first.peer_id],
                                             Push(session_id=first.session_id, step_id=step_id, position=position,
                                                  hidden=h)))
        # the insider's own session on the victim's node cannot name the victim's session
        stream, opened = await insider.open_session(node[second.peer_id], OpenSession(
            model=model_name, start=second.start, end=second.end, max_length=8, batch_size=1, codec="f32"))
        assert isinstance(opened, SessionOpened), opened
        for message in (Step(session_id=second.session_id, step_id=U64_MAX, position=position, hidden=h),
                        SetUpstream(session_id=second.session_id, upstream=insider.host.peer_id),
                        CloseSession(session_id=second.session_id)):
            replies.append(await insider.exchange(stream, message))
        # a client of version 1 (§5.10 "Version"): its protocol name is not served at all
        with pytest.raises(UnknownProtocolError, match="/biopetals/node/1"):
            await insider.host.call(node[second.peer_id], "/biopetals/node/1",
                                    pack_envelope(NodeInfoRequest.TYPE, {}, version=1), timeout=20.0)
    return replies


def test_an_insider_cannot_drive_another_users_session(checkpoint, reference):
    ids = prompt_ids(checkpoint)
    full = reference.generate(ids, max_new_tokens=12, do_sample=False)
    with LocalSwarm(checkpoint, [(0, 4), (4, 8)]) as swarm:
        model = remote_model(checkpoint, swarm)
        try:
            with model.inference_session(max_length=64) as session:
                first = model.generate(ids, max_new_tokens=6, do_sample=False)
                victim = session.chains[0]
                attacked_at = victim.position
                replies = asyncio.run(insider_attacks(swarm, victim, model.swarm.model_name,
                                                      model.config.hidden_size))
                second = model.generate(first[:, -1:], max_new_tokens=6, do_sample=False)
                failovers = session.failovers
        finally:
            model.close()
    codes = [r.code if isinstance(r, Error) else type(r).__name__ for r in replies]
    assert codes == [ErrorCode.FORBIDDEN] * 5 + [ErrorCode.UNKNOWN_SESSION] * 3, replies
    assert [r.step_id for r in replies[:5]] == [attacked_at + 1, attacked_at + 1, U64_MAX, attacked_at + 1,
                                                 attacked_at + 1]
    assert failovers == 0  # nothing reached the victim: no error on its streams, no failover
    assert torch.equal(torch.cat([first, second[:, 1:]], dim=1), full)


class Once(StoppingCriteria):
    """Runs ``action`` once, when the sequences reach ``length`` tokens; never stops generation."""

    def __init__(self, length: int, action) -> None:
        self.length, self.action = length, action

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] == self.length and self.action is not None:
            self.action, action = None, self.action
            action()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_failover_in_the_middle_rebinds_the_next_session(checkpoint, reference):
    """kill -9 the node serving the middle span: its replacement is named upstream of the last session
    (SetUpstream), so its pushes are accepted: same tokens as transformers, no push refused."""
    new_tokens = 16
    ids = prompt_ids(checkpoint)
    with LocalSwarm(checkpoint, [(0, 3), (3, 6), (3, 6), (6, 8)]) as swarm:
        model = remote_model(checkpoint, swarm)
        killed = []

        def kill_middle_node():
            peer = next(p for p, a, _ in model.active_session.route[0] if a == 3)
            killed.append(next(n for n in swarm.nodes if n.peer_id == peer))
            killed[-1].kill()

        try:
            with model.inference_session(max_length=ids.shape[1] + new_tokens) as session:
                t = time.monotonic()
                ours = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                      stopping_criteria=StoppingCriteriaList([Once(ids.shape[1] + new_tokens // 2,
                                                                                   kill_middle_node)]))
                elapsed = time.monotonic() - t
                route = session.route[0]
                failovers = session.failovers
        finally:
            model.close()
        logs = {n.peer_id: n.log_path.read_text(errors="replace") for n in swarm.nodes}
    ref = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    assert killed and failovers == 1 and [s for _, s, _ in route] == [0, 3, 6]
    replacement = route[1][0]
    assert replacement != killed[0].peer_id
    assert "refused" not in logs[replacement], logs[replacement]  # every push into 6:8 was accepted
    assert torch.equal(ours, ref)
    assert elapsed < 60, elapsed
