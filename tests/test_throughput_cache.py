"""The start-up throughput cache (issue 23 item 5): node/throughput_cache.py's rules without I/O,
node/throughput_store.py on real files, and node/benchmark.py ``cached_throughput`` on a real
tiny span. A bad cache file is never trusted and never fails a start."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from biopetals.node.throughput_cache import (
    FORMAT, MAX_ENTRIES, MAX_FILE_BYTES, VERSION, MeasureFacts, Throughput, cache_path_option, default_cache_path,
    lookup, merge, parse_cache,
)
from biopetals.node.throughput_store import read_cached, read_or_measure, write_cached
from support_models import tiny_llama_checkpoint  # noqa: F401  (session fixture)

FACTS = MeasureFacts(config="ab" * 32, blocks=4, max_length=256, dtype="float32", quant="none", attention="sdpa",
                     device_type="cpu", device_name="Some CPU", cpu_count=2, torch_version="2.13.0",
                     threads=2, method="v1")
TPS = Throughput(12.5, 900.0)
OTHER_VALUES = {"config": "cd" * 32, "blocks": 5, "max_length": 512, "dtype": "bfloat16", "quant": "int8",
                "attention": "eager", "device_type": "cuda", "device_name": "Other", "cpu_count": 16,
                "torch_version": "2.14.0", "threads": 1, "method": "v2"}


def test_every_fact_changes_the_key_and_equal_facts_share_it():
    assert set(OTHER_VALUES) == {f.name for f in dataclasses.fields(MeasureFacts)}
    assert FACTS.key() == dataclasses.replace(FACTS).key()
    keys = {dataclasses.replace(FACTS, **{name: value}).key() for name, value in OTHER_VALUES.items()}
    assert len(keys) == len(OTHER_VALUES) and FACTS.key() not in keys


def test_merge_then_parse_round_trips_and_keeps_other_entries():
    other = dataclasses.replace(FACTS, blocks=8)
    first = parse_cache(merge({}, other, Throughput(1.0, 2.0), now=100.0))
    assert first.problems == []
    data = merge(first.entries, FACTS, TPS, now=200.0)
    parsed = parse_cache(data)
    assert parsed.problems == []
    assert lookup(parsed.entries, FACTS.key()) == TPS
    assert lookup(parsed.entries, other.key()) == Throughput(1.0, 2.0)
    assert lookup(parsed.entries, dataclasses.replace(FACTS, threads=3).key()) is None
    doc = json.loads(data)
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    assert doc["entries"][FACTS.key()]["facts"]["blocks"] == 4  # readable by a person


def test_merge_keeps_the_newest_entries_and_refuses_non_numbers():
    entries = {}
    for i in range(MAX_ENTRIES + 3):
        entries = parse_cache(merge(entries, dataclasses.replace(FACTS, blocks=i + 1), TPS, now=float(i))).entries
    assert len(entries) == MAX_ENTRIES
    assert lookup(entries, dataclasses.replace(FACTS, blocks=1).key()) is None  # the oldest went
    assert lookup(entries, dataclasses.replace(FACTS, blocks=MAX_ENTRIES + 3).key()) == TPS
    for bad in (Throughput(0.0, 1.0), Throughput(1.0, float("nan")), Throughput(float("inf"), 1.0)):
        with pytest.raises(ValueError):
            merge({}, FACTS, bad, now=0.0)


def _file(entries: object, **top: object) -> bytes:
    return json.dumps({"format": FORMAT, "version": VERSION, "entries": entries, **top}).encode()


GOOD = {"inference_tps": 1.0, "forward_tps": 2.0, "measured_at": 5.0}


@pytest.mark.parametrize("data, problem", [
    (b"", "not JSON"),
    (b"{\"format\": ", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "not a biopetals-throughput-cache file"),
    (json.dumps({"format": "petals", "version": 1, "entries": {}}).encode(), "not a biopetals-throughput-cache"),
    (json.dumps({"format": FORMAT, "version": 2, "entries": {}}).encode(), "version 2"),
    (json.dumps({"format": FORMAT, "version": "1", "entries": {}}).encode(), "version '1'"),
    (_file([1]), "entries is not an object"),
    (b" " * (MAX_FILE_BYTES + 1), "larger than"),
    (b"[" * 100000, "not JSON"),  # nesting deeper than the parser's recursion
])
def test_a_bad_file_gives_no_entries_and_says_why(data, problem):
    parsed = parse_cache(data)
    assert parsed.entries == {} and len(parsed.problems) == 1 and problem in parsed.problems[0]


@pytest.mark.parametrize("entry, problem", [
    ("x", "not an object"),
    ({**GOOD, "inference_tps": -1.0}, "inference_tps"),
    ({**GOOD, "inference_tps": 0}, "inference_tps"),
    ({**GOOD, "forward_tps": True}, "forward_tps"),
    ({**GOOD, "forward_tps": "2"}, "forward_tps"),
    ({**GOOD, "forward_tps": 1e300}, "forward_tps"),
    ({k: v for k, v in GOOD.items() if k != "measured_at"}, "measured_at"),
])
def test_a_bad_entry_is_skipped_and_the_good_ones_kept(entry, problem):
    text = json.dumps({"format": FORMAT, "version": VERSION, "entries": {"a" * 64: entry, "b" * 64: GOOD}})
    parsed = parse_cache(text.encode())
    assert list(parsed.entries) == ["b" * 64] and len(parsed.problems) == 1 and problem in parsed.problems[0]


def test_non_finite_numbers_and_bad_keys_are_skipped():
    text = _file({"c" * 64: GOOD}).decode()
    for bad in ('"inference_tps": NaN', '"forward_tps": Infinity', '"measured_at": -Infinity'):
        name = bad.split('"')[1]
        parsed = parse_cache(text.replace(f'"{name}": {GOOD[name]}', bad).encode())
        assert parsed.entries == {} and name in parsed.problems[0]
    for key in ("C" * 64, "c" * 63, "g" * 64, "", "0" * 65):
        parsed = parse_cache(_file({key: GOOD, "d" * 64: GOOD}))
        assert list(parsed.entries) == ["d" * 64] and "SHA-256" in parsed.problems[0]


def test_mutated_files_never_raise():
    """Bounded: 300 random byte mutations of a valid file are parsed or refused, nothing else."""
    rng = random.Random(23)
    valid = merge(parse_cache(merge({}, dataclasses.replace(FACTS, blocks=2), TPS, 1.0)).entries, FACTS, TPS, 2.0)
    for _ in range(300):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        parsed = parse_cache(bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data))
        for key, entry in parsed.entries.items():
            assert lookup(parsed.entries, key) == Throughput(float(entry["inference_tps"]), float(entry["forward_tps"]))


def test_default_path_and_the_option(tmp_path):
    assert default_cache_path({"BIOPETALS_CACHE": str(tmp_path)}) == tmp_path / "throughput.json"
    assert default_cache_path({}, home=tmp_path) == tmp_path / ".cache" / "biopetals" / "throughput.json"
    assert cache_path_option("none") is None and cache_path_option("NONE") is None
    assert cache_path_option(str(tmp_path / "t.json")) == tmp_path / "t.json"
    assert cache_path_option(None, {"BIOPETALS_CACHE": str(tmp_path)}) == tmp_path / "throughput.json"
    with pytest.raises(ValueError, match="empty"):
        cache_path_option(" ")


def test_store_reads_writes_and_survives_a_corrupt_file(tmp_path, caplog):
    path = tmp_path / "sub" / "throughput.json"
    assert read_cached(path, FACTS) is None  # no file: a miss, no warning
    assert write_cached(path, FACTS, TPS, now=1.0)
    assert read_cached(path, FACTS) == TPS
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # nothing left behind
    path.write_bytes(b'{"format": "biopetals-throughput-cache", "version": 1, "entries": {"' + b"a" * 64)
    with caplog.at_level(logging.WARNING, logger="biopetals.node.throughput"):
        assert read_cached(path, FACTS) is None
    assert "not JSON" in caplog.text
    assert write_cached(path, FACTS, TPS, now=2.0)  # the corrupt file is replaced
    assert read_cached(path, FACTS) == TPS


def test_store_write_failure_is_a_warning(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="biopetals.node.throughput"):
        assert write_cached(blocker / "throughput.json", FACTS, TPS, now=1.0) is False
        assert read_cached(blocker / "throughput.json", FACTS) is None
    assert "not written" in caplog.text


def test_a_node_reads_its_span_throughput_from_the_cache(tmp_path, tiny_llama_checkpoint):  # noqa: F811
    from biopetals.models.blocks import BlockSpan
    from biopetals.node.benchmark import cached_throughput, measure_facts

    span = BlockSpan.load(tiny_llama_checkpoint, 0, 2)
    path = tmp_path / "throughput.json"
    measured, hit = cached_throughput(span, "none", path)
    assert not hit and measured[0] > 0 and measured[1] > 0
    again, hit = cached_throughput(span, "none", path)
    assert hit and again == measured  # read, not measured again (a measurement never repeats exactly)
    entries = parse_cache(path.read_bytes()).entries
    assert list(entries) == [measure_facts(span, "none").key()]
    _, hit = cached_throughput(span, "int8", path)  # another fact: measured, and kept beside
    assert not hit and len(parse_cache(path.read_bytes()).entries) == 2
    _, hit = cached_throughput(span.sub(0, 1), "none", path)  # another block count
    assert not hit
    _, hit = cached_throughput(span, "none", None)  # no cache: always measured
    assert not hit and len(parse_cache(path.read_bytes()).entries) == 3


def test_cli_option(tmp_path, monkeypatch):
    from biopetals.node.cli import _options, build_parser
    from biopetals.protocol.identity import Identity
    from biopetals.transport.keyfiles import write_swarm_key

    text = " ".join(build_parser().format_help().split())
    assert "--throughput-cache PATH|none" in text and "throughput.json" in text
    write_swarm_key(tmp_path / "k", None)
    base = ["--model", "m", "--swarm-key", str(tmp_path / "k")]
    monkeypatch.setenv("BIOPETALS_CACHE", str(tmp_path))
    identity = Identity.generate()
    for argv, expected in ((base, tmp_path / "throughput.json"), ([*base, "--throughput-cache", "none"], None),
                           ([*base, "--throughput-cache", str(tmp_path / "x.json")], tmp_path / "x.json")):
        assert _options(build_parser().parse_args(argv), identity).throughput_cache == expected


def _counting(value: Throughput, seconds: float = 0.0):
    calls = []

    def measure() -> Throughput:
        calls.append(1)
        time.sleep(seconds)
        return value
    return measure, calls


def test_nodes_of_one_machine_measure_one_at_a_time_and_the_waiting_one_reads(tmp_path):
    """Two nodes with the same facts start together: one measures under the lock, the other
    waits and reads its result (as Petals' lock does)."""
    path = tmp_path / "throughput.json"
    measure, calls = _counting(TPS, seconds=0.3)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: read_or_measure(path, FACTS, measure), range(2)))
    assert len(calls) == 1
    assert sorted(hit for _, hit in results) == [False, True] and {tps for tps, _ in results} == {TPS}


def test_a_held_lock_is_waited_for_a_bounded_time(tmp_path, caplog):
    import fcntl

    path = tmp_path / "throughput.json"
    measure, calls = _counting(TPS)
    with open(tmp_path / "throughput.json.lock", "a+b") as other:  # another node, measuring for ever
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with caplog.at_level(logging.WARNING, logger="biopetals.node.throughput"):
            assert read_or_measure(path, FACTS, measure, lock_wait=0.2) == (TPS, False)
    assert calls == [1] and "still locked" in caplog.text
    assert read_cached(path, FACTS) == TPS  # stored all the same


def test_a_number_not_worth_keeping_is_not_stored(tmp_path, caplog):
    path = tmp_path / "throughput.json"
    measure, calls = _counting(Throughput(0.0, 0.0))
    with caplog.at_level(logging.WARNING, logger="biopetals.node.throughput"):
        assert read_or_measure(path, FACTS, measure) == (Throughput(0.0, 0.0), False)
        assert read_or_measure(path, FACTS, measure) == (Throughput(0.0, 0.0), False)
    assert calls == [1, 1] and "not stored" in caplog.text


def test_a_node_process_writes_the_cache_and_the_next_one_reads_it(tmp_path, tiny_llama_checkpoint):  # noqa: F811
    """The wiring, real processes: ``--throughput-cache`` reaches the start-up measurement; a second
    node with the same facts (4 blocks of the same model) announces the first's numbers unmeasured."""
    from support_swarm import Swarm

    cache = tmp_path / "cache" / "throughput.json"
    with Swarm(tmp_path) as swarm:
        first = swarm.start_node(tiny_llama_checkpoint, "0:4", "--throughput-cache", str(cache))
        second = swarm.start_node(tiny_llama_checkpoint, "4:8", "--throughput-cache", str(cache))
        lines = [next(line for line in node.output().splitlines() if "throughput: inference" in line)
                 for node in (first, second)]
    assert lines[0].endswith("(measured)") and lines[1].endswith(f"(read from {cache})")
    assert lines[0].split("throughput: ")[1].split(" (")[0] == lines[1].split("throughput: ")[1].split(" (")[0]
    assert len(parse_cache(cache.read_bytes()).entries) == 1


def test_an_unwritable_cache_directory_only_costs_a_measurement(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    measure, calls = _counting(TPS)
    with caplog.at_level(logging.WARNING, logger="biopetals.node.throughput"):
        assert read_or_measure(blocker / "throughput.json", FACTS, measure) == (TPS, False)
    assert calls == [1] and "no lock" in caplog.text and "not written" in caplog.text
