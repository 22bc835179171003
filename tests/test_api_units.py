"""Units of biopetals-api without a swarm: text pieces and stop sequences, seeded sampling, keys, bind rule, layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from support_api import write_api_keys
from test_sans_io import imported_modules

from biopetals.api.auth import check_bind, check_key, is_loopback, load_api_keys
from biopetals.api.errors import APIError
from biopetals.api.sampling import SeededSampler
from biopetals.api.text import TextAccumulator
from biopetals.transport.keyfiles import KeyFileError

API = Path(__file__).resolve().parent.parent / "api"


def test_api_imports_no_node_code():
    """DESIGN.md layers: api/ may use client, models, protocol, transport, dht, never node."""
    for path in sorted(API.glob("*.py")):
        for line, module in imported_modules(ast.parse(path.read_text())):
            assert not module.startswith("biopetals.node"), f"{path.name}:{line} imports {module}"


class CharTokenizer:
    """One token per character (ids are code points); an id of 0xFFFD+ stands for half a character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def feed(acc: TextAccumulator, text: str) -> list[str]:
    ids, pieces = [], []
    for ch in text:
        ids.append(ord(ch))
        pieces.append(acc.add(ids))
    pieces.append(acc.add(ids, final=True))
    return pieces


def test_pieces_join_to_the_text_and_stop_sequences_cut_it():
    acc = TextAccumulator(CharTokenizer())
    assert "".join(feed(acc, "hello world")) == "hello world" and not acc.stopped
    acc = TextAccumulator(CharTokenizer(), ["wor", "xyz"])
    pieces = feed(acc, "hello world")
    assert "".join(pieces) == "hello " == acc.text and acc.stopped
    assert all("w" not in p for p in pieces)  # a possible stop sequence's start is held back, never sent
    acc = TextAccumulator(CharTokenizer(), ["lo"])
    assert "".join(feed(acc, "hello")) == "hel"


def test_an_incomplete_character_is_held_back():

    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    acc = TextAccumulator(Bytes())
    data = "é!".encode()  # é is two bytes
    assert acc.add(list(data[:1])) == ""
    assert acc.add(list(data[:2])) == "é"
    assert acc.add(list(data), final=True) == "!"


def test_seeded_sampler_is_reproducible_and_greedy_is_refused():
    scores = torch.randn(1, 50)
    ids = torch.zeros(1, 3, dtype=torch.long)

    def draw(seed):
        sampler = SeededSampler(1.0, 0.9, seed)
        return [int(sampler(ids, scores.clone()).argmax()) for _ in range(20)]

    assert draw(5) == draw(5) and draw(5) != draw(6)
    out = SeededSampler(0.7, 1.0, 1)(ids, scores.clone())
    assert torch.isfinite(out).sum() == 1  # exactly one token left for generate()'s argmax
    with pytest.raises(ValueError):
        SeededSampler(0.0, 1.0, None)


def test_api_keys_file_rules(tmp_path):
    path = write_api_keys(tmp_path / "keys", "a" * 20, "b" * 16)
    assert load_api_keys(path) == ("a" * 20, "b" * 16)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_api_keys(path)
    with pytest.raises(KeyFileError, match="at least 16"):
        load_api_keys(write_api_keys(tmp_path / "short", "short"))
    with pytest.raises(KeyFileError, match="no API key"):
        load_api_keys(write_api_keys(tmp_path / "empty"))


def test_bind_rule_and_key_check():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("lab-gpu")
    check_bind("127.0.0.1", None)
    with pytest.raises(ValueError, match="--api-keys"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", ("k" * 16,))
    keys = ("k" * 16, "m" * 16)
    check_key("Bearer " + "m" * 16, keys)
    for bad in (None, "", "Bearer", "Bearer " + "x" * 16, "Basic " + "k" * 16, "k" * 16):
        with pytest.raises(APIError) as info:
            check_key(bad, keys)
        assert info.value.status == 401 and info.value.body()["error"]["code"] == "invalid_api_key"


def test_a_request_error_is_the_caller_s_400_and_a_swarm_failure_a_503():
    """A request no node can serve (a limit, a shape) is the caller's to fix: 400, not a 500 or 503."""
    from biopetals.api.errors import swarm_error
    from biopetals.client.errors import PeerFailure, RequestError, SwarmError

    refused = swarm_error(RequestError.before_sending("batch 300 > MAX_BATCH 256"))
    assert (refused.status, refused.code) == (400, "invalid_value")
    assert "MAX_BATCH" in refused.message
    failed = swarm_error(SwarmError("blocks 3:8 have no live node.", [PeerFailure("12D3KooWx", "reset")]))
    assert (failed.status, failed.code) == (503, "swarm_failed")


def test_verify_options_reach_the_client(tmp_path):
    """``--verify P`` and ``--verify-evidence-dir`` go to the client's ``from_pretrained`` (through Engine);
    default 0 (off); a rate outside [0, 1] is refused by the parser (exit status 2)."""
    from biopetals.api.cli import build_parser, engine_options

    base = ["--model", "m", "--public", "--initial-peers", "/ip4/127.0.0.1/tcp/31337/p2p/" + "12D3KooW" + "A" * 44]
    parser = build_parser()
    default = engine_options(parser.parse_args(base))
    assert default["verify"] == 0.0 and default["verify_evidence_dir"] is None
    options = engine_options(parser.parse_args(base + ["--verify", "0.05", "--verify-evidence-dir", str(tmp_path)]))
    assert options["verify"] == 0.05 and options["verify_evidence_dir"] == str(tmp_path)
    assert options["prompt_lookup"] == 0 and options["codec"] == "f16"  # the other options still pass
    for bad in ("1.5", "-0.1", "nan", "often"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(base + ["--verify", bad])
        assert info.value.code == 2
    assert "--verify P" in parser.format_help() and "--verify-evidence-dir" in parser.format_help()
