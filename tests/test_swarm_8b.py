"""An 8B-shaped swarm end to end (issue 22, item 4): Llama-3-8B's exact configuration on real nodes.

The checkpoint comes from scripts/make_llama3_8b.py (random bf16 weights, written shard by shard,
``model-0000X-of-0000N.safetensors`` + index). Two sizes run the same checks:

* ``scaled`` (default suite): the scaled-down copy, width 4096, intermediate 14336, 32/8 heads,
  rope_theta 500000, **2 layers** and a 2048-token vocabulary (0.9 GB), 2 nodes of one block;
* ``full`` (``-m slow``): the real size, 32 layers, vocab 128256 (16.06 GB in 4 shards), 4 nodes
  of 8 blocks. Set ``BIOPETALS_8B_CHECKPOINT`` to a directory written by the script to reuse it
  (else it is written into a temporary directory and removed afterwards; a copy with fewer layers
  there is split evenly over the 4 nodes). Needs ~20 GB of RAM (the nodes' blocks, mapped from
  the files, plus the client's embeddings and head): run it under the heavy lock.

The swarm: ``biopetals-manifest`` hashes the checkpoint; the first nodes serve their blocks from
the directory (``--dtype bfloat16``, weights mapped from the shards, not copied), and the last
node starts from the manifest file alone and fetches its blocks from them (spec/weights.md). The
client keeps embeddings and head in bf16, activations travel as bf16 (lossless for bf16 nodes).

Checked against transformers' own ``LlamaModel`` built from one span of the same weights at a
time (tests/support_8b.py; a whole 8B model does not fit beside the nodes): each span's output,
greedy tokens, the loss and the embeddings' gradient of a forward+backward step. Tolerances are
for bf16 compute (8 significant bits, relative step 2^-8 = 3.9e-3): outputs within 2^-6 = 1.6e-2
of the largest magnitude (measured: bitwise equal, the same kernels run on the same inputs);
loss within 1e-3 relative and the gradient within 2^-5 of its largest entry. Memory: each
node's peak resident set is its share of the blocks plus at most 640 MiB (Python, torch,
activations), and the pages it maps from the checkpoint are its own blocks only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from support_8b import (ReferenceSpan, block_bytes, client_tensors, generator_module, make_8b_checkpoint,
                        proc_memory, read_tensors, reference_logits)
from support_swarm import NodeProcess, Swarm
from transformers.loss.loss_utils import ForCausalLMLoss

from biopetals.client import AutoDistributedModelForCausalLM
from biopetals.client.remote_forward import forward_all
from biopetals.protocol.manifest import MANIFEST_FILE, Manifest, parse_manifest
from biopetals.weights.cli import manifest_main

pytestmark = [pytest.mark.timeout(1800), pytest.mark.exactness]

MiB = 1 << 20
NODE_OVERHEAD = 640 * MiB  # Python, torch, transformers, the transport, activations of these small calls
OUTPUT_TOLERANCE = 2.0 ** -6
GRAD_TOLERANCE = 2.0 ** -5
LOSS_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Size:
    layers: int
    vocab: int
    spans: tuple[tuple[int, int], ...]  # the last one is fetched from the others
    max_shard_bytes: int


SIZES = {
    "scaled": Size(2, 2048, ((0, 1), (1, 2)), 250_000_000),  # several shards, like the real one
    "full": Size(32, 128256, ((0, 8), (8, 16), (16, 24), (24, 32)), 5_000_000_000),
}


@dataclass
class BigSwarm:
    size: Size
    checkpoint: Path
    fetched: Path  # the last node's --weights-dir
    manifest: Manifest
    manifest_output: str
    swarm: Swarm
    nodes: list[NodeProcess]
    model: object
    at_ready: list[dict[str, int]] = field(default_factory=list)

    def span_dir(self, start: int) -> Path:
        """Where the node serving the span starting at ``start`` reads its weights."""
        return self.fetched if start == self.size.spans[-1][0] else self.checkpoint

    def reference(self, start: int, end: int) -> ReferenceSpan:
        """transformers' LlamaModel of blocks [start, end), from the files that node maps (shared pages)."""
        return ReferenceSpan.load(self.span_dir(start), start, end)


def _checkpoint(name: str, tmp: Path) -> tuple[Path, Size, bool]:
    """(directory, its size, whether this test wrote it and removes it). A given directory
    (``BIOPETALS_8B_CHECKPOINT``) is served by 4 nodes splitting its layers evenly."""
    given = os.environ.get("BIOPETALS_8B_CHECKPOINT")
    if name == "full" and given:
        config = json.loads((Path(given) / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        cuts = [round(i * layers / 4) for i in range(5)]
        return Path(given), Size(layers, int(config["vocab_size"]), tuple(zip(cuts, cuts[1:])), 0), False
    size = SIZES[name]
    return make_8b_checkpoint(tmp / f"llama3-8b-{name}", size.layers, size.vocab,
                              max_shard_bytes=size.max_shard_bytes), size, True


@pytest.fixture(scope="module", params=["scaled", pytest.param("full", marks=pytest.mark.slow)])
def big(request):
    tmp = Path(tempfile.mkdtemp(prefix="biopetals-8b-"))
    try:
        checkpoint, size, owned = _checkpoint(request.param, tmp)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert manifest_main([str(checkpoint), "--no-progress"]) == 0
        manifest = parse_manifest((checkpoint / MANIFEST_FILE).read_bytes())
        fetched = tmp / "fetched"
        node_args = ("--dtype", "bfloat16", "--no-benchmark")
        with Swarm(tmp) as swarm:
            nodes = [swarm.start_node(checkpoint, f"{a}:{b}", *node_args, timeout=600) for a, b in size.spans[:-1]]
            a, b = size.spans[-1]
            nodes.append(swarm.start_node(checkpoint / MANIFEST_FILE, f"{a}:{b}", *node_args, "--weights-dir",
                                          str(fetched), timeout=900))
            at_ready = [proc_memory(n.pid) for n in nodes]
            model = AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint, initial_peers=swarm.initial_peers, swarm_key=swarm.key_path, codec="bf16",
                dtype=torch.bfloat16, step_timeout=600.0, forward_timeout=600.0)
            try:
                yield BigSwarm(size, checkpoint, fetched, manifest, out.getvalue(), swarm, nodes, model, at_ready)
            finally:
                model.close()
                for node in nodes:  # nothing left to check: no need for their graceful (announcing) exit
                    node.kill()
        if not owned:
            (checkpoint / MANIFEST_FILE).unlink(missing_ok=True)  # leave the given directory as it was
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_generator_plans_llama3_8b_exactly():
    """No writing: the full plan is Meta-Llama-3-8B's (8.03 B parameters, 16,060,522,496 bytes of bf16,
    4 shards of at most 5 GB); a smaller copy keeps Llama-3's special-token layout."""
    gen = generator_module()
    config = gen.llama3_8b_config()
    assert {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "rope_theta", "bos_token_id",
                                   "eos_token_id", "max_position_embeddings")} == {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0, "bos_token_id": 128000,
        "eos_token_id": 128001, "max_position_embeddings": 8192}
    specs = gen.tensor_specs(config)
    assert len(specs) == 32 * 9 + 3
    assert sum(s.numel for s in specs) == 8_030_261_248
    shards = gen.shard_plan(specs)
    assert len(shards) == 4 and all(sum(s.nbytes for s in shard) <= 5_000_000_000 for shard in shards)
    assert sum(s.nbytes for shard in shards for s in shard) == 16_060_522_496
    small = gen.llama3_8b_config(2, 2048)
    assert (small["bos_token_id"], small["eos_token_id"]) == (1792, 1793)
    with pytest.raises(ValueError):
        gen.llama3_8b_config(33)


def test_checkpoint_is_sharded_bf16_with_the_real_config(big):
    gen = generator_module()
    files = sorted(p.name for p in big.checkpoint.glob("*.safetensors"))
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    if big.size.max_shard_bytes:  # written here: as many shards as the generator's plan
        assert n == len(gen.shard_plan(gen.tensor_specs(gen.llama3_8b_config(big.size.layers, big.size.vocab)),
                                       big.size.max_shard_bytes)) > 1
    if (big.size.layers, big.size.vocab) == (32, 128256):
        assert n == 4  # as Meta-Llama-3-8B
    config = (big.checkpoint / "config.json").read_text()
    assert config.strip() == json.dumps(gen.llama3_8b_config(big.size.layers, big.size.vocab),
                                                       indent=2)
    assert big.model.config.rope_parameters["rope_theta"] == 500000.0
    assert big.model.config.hidden_size == 4096 and big.model.config.num_key_value_heads == 8
    assert client_tensors(big.checkpoint)["lm_head.weight"].dtype == torch.bfloat16


def test_the_manifest_hashes_every_block(big):
    m = big.manifest
    assert m.num_blocks == big.size.layers
    assert f"swarm name: {m.swarm_name}" in big.manifest_output
    sizes = {m.parts[i].size for i in range(m.num_blocks)}
    assert sizes == {block_bytes(big.checkpoint)}  # 436 MB a block
    assert all(len(m.parts[i].chunks) == -(-m.parts[i].size // m.chunk_size) for i in range(m.num_blocks))


def test_the_new_node_fetched_its_blocks_from_its_peers(big):
    a, b = big.size.spans[-1]
    log = big.nodes[-1].output()
    found = re.search(r"fetched (\d+) chunks \(([\d.]+) MB\) in ([\d.]+) s \(([\d.]+) MB/s\) from (\d+) peers", log)
    assert found, log[-2000:]
    assert int(found[1]) == sum(len(big.manifest.parts[i].chunks) for i in range(a, b))
    assert int(found[5]) >= 1
    held = sorted(p.name for p in big.fetched.glob("block-*.safetensors"))
    assert held == [f"block-{i:05d}.safetensors" for i in range(a, b)]  # its blocks, nothing else
    name = f"model.layers.{b - 1}.mlp.down_proj.weight"
    assert torch.equal(read_tensors(big.fetched, [name])[name], read_tensors(big.checkpoint, [name])[name])


def test_each_span_equals_transformers_decoder_layers_on_the_same_weights(big):
    ids = torch.randint(0, big.size.vocab - 256, (2, 48), generator=torch.Generator().manual_seed(4))
    emb = big.model.model.embed_tokens(ids).detach()
    out, trace = big.model.swarm.loop.run(forward_all(big.model.swarm, emb))
    assert tuple((r.start, r.end) for r, _ in trace) == big.size.spans
    outputs = [x for _, x in trace[1:]] + [out]  # a span's output is the next span's input
    for (route, given), got in zip(trace, outputs):
        with torch.no_grad():
            want = big.reference(route.start, route.end)(given)
        print(f"span {route.start}:{route.end}: max difference / max magnitude {close(got, want):.2e}")
        assert close(got, want) <= OUTPUT_TOLERANCE, (route.start, route.end)


def test_greedy_generation_through_the_chain_equals_transformers(big):
    ids = torch.randint(0, big.size.vocab - 256, (1, 16), generator=torch.Generator().manual_seed(5))
    ours = big.model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    want = ids
    for _ in range(4):  # no cache: each token recomputes the sequence, one span loaded at a time
        with torch.no_grad():
            logits = _reference_logits(big, want)
        want = torch.cat([want, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ours, want), (ours[0, 16:].tolist(), want[0, 16:].tolist())


def _reference_logits(big: BigSwarm, ids: torch.Tensor, embed: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' spans one after another, each read from the directory its node reads."""
    return reference_logits(big.checkpoint, [(big.span_dir(a), a, b) for a, b in big.size.spans], ids, embed)


def test_a_forward_backward_step_through_the_chain_equals_transformers(big):
    ids = torch.randint(0, big.size.vocab - 256, (2, 32), generator=torch.Generator().manual_seed(6))
    rows = ids.unique()  # sorted: the embedding rows this batch uses (the gradient is zero elsewhere)
    weight = big.model.model.embed_tokens.weight
    weight.requires_grad_(True)
    try:
        weight.grad = None
        loss = big.model(input_ids=ids, labels=ids).loss
        loss.backward()
        ours = weight.grad[rows].clone()  # not the whole 1 GB gradient of the full-size vocabulary
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    used = client_tensors(big.checkpoint)["model.embed_tokens.weight"][rows].clone().requires_grad_(True)
    logits = _reference_logits(big, torch.searchsorted(rows, ids), used)  # the same embeddings, looked up in `used`
    want_loss = ForCausalLMLoss(logits, ids, vocab_size=big.size.vocab)
    want_loss.backward()
    print(f"loss {loss.item():.6f} vs {want_loss.item():.6f}; embeddings' gradient: max difference / max "
          f"magnitude {close(ours, used.grad):.2e}")
    assert abs(loss.item() - want_loss.item()) <= LOSS_TOLERANCE * abs(want_loss.item())
    assert ours.abs().max() > 0
    assert close(ours, used.grad) <= GRAD_TOLERANCE


def test_each_node_holds_only_its_share_of_the_blocks(big):
    """Last on purpose: peaks after generation and fine-tuning calls."""
    share_of_one = block_bytes(big.checkpoint)
    for (a, b), node, ready in zip(big.size.spans, big.nodes, big.at_ready):
        share = (b - a) * share_of_one
        now = proc_memory(node.pid)
        print(f"node {a}:{b}: share {share / 2**30:.2f} GiB, peak RSS {now['VmHWM'] / 2**30:.2f} GiB, "
              f"now RssFile {now['RssFile'] / 2**30:.2f} GiB, RssAnon {now['RssAnon'] / 2**30:.2f} GiB")
        assert now["VmHWM"] <= share + NODE_OVERHEAD, (a, b, now)
        # the pages mapped from the checkpoint: this node's blocks, never a neighbour's
        assert now["RssFile"] - ready["RssFile"] <= share + 64 * MiB, (a, b, ready, now)
        # bf16 weights are used where they are mapped, never copied into the node's own memory
        assert now["RssAnon"] - ready["RssAnon"] <= NODE_OVERHEAD - 256 * MiB, (a, b, ready, now)
