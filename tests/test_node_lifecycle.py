"""The ``biopetals-node`` command: options, start-up errors, DHT announcements, SIGTERM, bf16.

Real processes (tests/support_swarm.py). A DHT client reads the nodes' announcements
(spec/announcement.md) through the swarm like a client library would.
"""

from __future__ import annotations

import asyncio
import socket
import json
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from support_models import make_tiny_checkpoint
from support_swarm import NODE_COMMAND, RawClient, Swarm

from biopetals.dht.ids import block_key
from biopetals.dht.node import DHT
from biopetals.models.config import model_info
from biopetals.protocol.announcement import State, decode_announcement
from biopetals.protocol.identity import PeerId
from biopetals.protocol.messages import CloseSession, NodeInfo, NodeInfoRequest, OpenSession, SessionOpened, Step, StepResult


def test_help_documents_every_option():
    out = subprocess.run(NODE_COMMAND + ["--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for option in ("--model", "--blocks", "--swarm-key", "--port", "--host", "--initial-peers", "--new-swarm", "--dtype",
                   "--quant", "--max-cache-tokens", "--identity", "--device", "--idle-timeout", "--announce-interval", "--announce"):
        assert option in out, option
    assert "31337" in out and "int8" in out and "nf4" in out and "bfloat16" in out


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "m", with_tokenizer=False, num_layers=2)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with Swarm(tmp_path) as swarm:
        result = subprocess.run(
            NODE_COMMAND + ["--model", str(ckpt), "--blocks", "0:1", "--swarm-key", str(swarm.key_path), "--new-swarm", "--port", "0"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 1
    assert "GPT2LMHeadModel" in result.stderr and "LlamaForCausalLM" in result.stderr and "Qwen2ForCausalLM" in result.stderr


async def _announcements(swarm, addr, model, blocks):
    from biopetals.protocol.identity import Identity
    from biopetals.transport.host import Host

    async with Host(Identity.generate(), swarm_key=swarm.swarm_key) as host:
        async with DHT(host, initial_peers=[addr], client_mode=True) as dht:
            found = await dht.get_many([block_key(model, b) for b in blocks])
    return {key: {str(PeerId(sub)): decode_announcement(value) for sub, (value, _) in recs.items()} for key, recs in found.items()}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_announce_online_then_offline_on_sigterm_and_bf16(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", with_tokenizer=False)
    model = model_info(ckpt).dht_prefix
    with Swarm(tmp_path) as swarm:
        a = swarm.start_node(ckpt, "0:4")
        # b announces a DNS name instead of its listen address (what a node behind NAT does);
        # everything below reaches b through it.
        port = _free_port()
        b = swarm.start_node(ckpt, "4:8", "--dtype", "bfloat16", "--port", str(port), "--announce", f"/dns4/localhost/tcp/{port}")
        assert b.addr == f"/dns4/localhost/tcp/{port}/p2p/{b.peer_id}"
        seen = asyncio.run(_announcements(swarm, a.addr, model, range(8)))
        for block in range(8):
            node = a if block < 4 else b
            ann = seen[block_key(model, block)][node.peer_id]
            assert ann.state == State.ONLINE
            assert (ann.start, ann.end) == ((0, 4) if block < 4 else (4, 8))
            assert ann.dtype == ("float32" if block < 4 else "bfloat16") and ann.quant == "none"
            assert node.addr in ann.addrs and ann.inference_tps > 0 and ann.forward_tps > 0
            if node is b:
                assert ann.addrs == (b.addr,)

        # bf16 numbers, reported: node B against transformers' fp32 model
        ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        torch.manual_seed(1)
        ids = torch.randint(4, ref.config.vocab_size, (1, 12))
        captured = {}
        hook = ref.model.layers[7].register_forward_hook(lambda m, a_, out: captured.__setitem__("out", out[0] if isinstance(out, tuple) else out))
        with torch.no_grad():
            hs = ref(ids, output_hidden_states=True).hidden_states
        hook.remove()

        async def bf16_session():
            async with RawClient(swarm.swarm_key) as client:
                info = await client.request(b.addr, NodeInfoRequest())
                assert isinstance(info, NodeInfo) and info.dtype == "bfloat16"
                stream, opened = await client.open_session(b.addr, OpenSession(model=model, start=4, end=8, max_length=12, batch_size=1, codec="f32"))
                assert isinstance(opened, SessionOpened)
                outs = []
                for i, (lo, hi) in enumerate([(0, 4)] + [(p, p + 1) for p in range(4, 12)]):
                    r = await client.exchange(stream, Step(session_id=opened.session_id, step_id=i, position=lo, hidden=hs[4][:, lo:hi]), "f32")
                    assert isinstance(r, StepResult), r
                    outs.append(r.hidden)
                await client.exchange(stream, CloseSession(session_id=opened.session_id))
                return torch.cat(outs, 1)

        got = asyncio.run(bf16_session())
        diff = (got - captured["out"]).abs().max().item()
        scale = captured["out"].abs().max().item()
        with capsys.disabled():
            print(f"\nnode bf16 vs transformers fp32 (blocks 4:8, prefill 4 + 8 decode): max abs diff {diff:.3e} (max |x| {scale:.2f})")
        assert diff < 0.05 * max(scale, 1.0)

        # SIGTERM: B announces offline, then exits cleanly
        assert b.stop() == 0
        assert "announced offline" in b.output()
        seen = asyncio.run(_announcements(swarm, a.addr, model, range(4, 8)))
        for block in range(4, 8):
            assert seen[block_key(model, block)][b.peer_id].state == State.OFFLINE
        assert a.alive()
        # biopetals-swarm reports the gap B left, with exit status 1 (for monitoring scripts)
        status = subprocess.run(
            [sys.executable, "-m", "biopetals.client.status", "--model", str(ckpt), "--swarm-key", str(swarm.key_path),
             "--initial-peers", a.addr], capture_output=True, text=True, timeout=120,
        )
        assert status.returncode == 1, status.stderr
        assert "NOT SERVED: blocks 4:8 have no online node" in status.stdout and "OFFLINE" in status.stdout
