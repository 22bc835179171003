"""A bounded, deterministic-budget version of every fuzz target (fuzz/README.md).

Parametrized over every target of every fuzz/targets_*.py, so targets other areas add are
picked up automatically. Each target gets its seed vectors, then Hypothesis-generated
inputs: random bytes, seeds with bytes flipped, inserted, deleted or cut, and splices of
two seeds. The invariant is the fuzzers': return, or raise RemoteProtocolError.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biopetals.protocol.errors import RemoteProtocolError

_RUN = Path(__file__).resolve().parent.parent / "fuzz" / "run.py"
_spec = importlib.util.spec_from_file_location("biopetals_fuzz_run", _RUN)
fuzz_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_run)

TARGETS = fuzz_run.discover_targets()
NAMES = sorted(TARGETS)


def run_target(name: str, data: bytes) -> None:
    function, _ = TARGETS[name]
    try:
        function(data)
    except RemoteProtocolError:
        pass  # expected for bad input; anything else fails the test


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)) if seeds else b"")
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice", "set"]))
        pos = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(pos, len(data) - 1)
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            # interesting bytes: msgpack type markers and length extremes
            data[min(pos, len(data) - 1)] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC0, 0xC4, 0xC6, 0xDC, 0xFF]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice" and seeds:
            other = draw(st.sampled_from(seeds))
            data[pos:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def test_every_area_has_targets():
    assert {"tensor", "tensor_embedded", "frames", "frames_bytewise"} <= set(TARGETS)


@pytest.mark.parametrize("name", NAMES)
def test_seed_vectors(name):
    _, files = TARGETS[name]
    if not files:
        pytest.skip("structure-aware target: it builds its inputs itself")
    seeds = fuzz_run.seed_inputs(files)
    assert seeds, f"{name} names vector files without vectors"
    for seed in seeds:
        run_target(name, seed)


@pytest.mark.parametrize("name", NAMES)
def test_random_and_mutated_inputs(name):
    seeds = fuzz_run.seed_inputs(TARGETS[name][1])

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=256), mutated(seeds)))
    def check(data: bytes) -> None:
        run_target(name, data)

    check()
