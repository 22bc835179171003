"""A node's start-up order (issue 23 item 5): the network first, torch and transformers after.

node/cli.py imports only light modules, listens, joins the DHT and prints ``DHT <multiaddr>``
before it imports torch and transformers, so the next node of a swarm can start joining at
once (client/local_swarm.py does); the phases are measured in benchmarks/bench_startup.py.
"""

from __future__ import annotations

import argparse
import json

import pytest
from support_env import env_when_imported

from biopetals.models.blocks import DTYPES
from biopetals.node import cli
from biopetals.node.options import check_blocks
from biopetals.node.quant import QUANT_MODES


def test_importing_the_node_program_loads_neither_torch_nor_transformers() -> None:
    assert env_when_imported("biopetals.node.cli", "torch", "PATH") == "not imported"
    assert env_when_imported("biopetals.node.cli", "transformers", "PATH") == "not imported"


def test_the_option_choices_named_in_the_cli_are_the_real_ones() -> None:
    assert sorted(cli.DTYPE_NAMES) == sorted(DTYPES)
    assert tuple(cli.QUANT_NAMES) == tuple(QUANT_MODES)


def test_dht_and_ready_lines_stay_bare(capsys) -> None:
    cli.output_line("DHT /ip4/127.0.0.1/tcp/1/p2p/x")
    cli.output_line("READY /ip4/127.0.0.1/tcp/1/p2p/x")
    cli.output_line("loaded")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["DHT /ip4/127.0.0.1/tcp/1/p2p/x", "READY /ip4/127.0.0.1/tcp/1/p2p/x"]
    assert lines[2].endswith(" loaded") and lines[2] != "loaded"


@pytest.mark.parametrize("blocks,num_blocks,error", [
    ((0, 8), None, None), ((4, 9), None, "--blocks 4:9 is not inside the model's 0:8"),
    (None, 8, None), (None, 9, "--num-blocks 9: the model has 8 blocks"), (None, None, None)])
def test_blocks_are_checked_against_config_json_before_listening(tmp_path, blocks, num_blocks, error) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 8}))
    args = argparse.Namespace(model=str(tmp_path), blocks=blocks, num_blocks=num_blocks)
    if error is None:
        cli.check_blocks_early(args)
    else:
        with pytest.raises(ValueError, match=error):
            cli.check_blocks_early(args)


def test_no_config_or_a_bad_one_is_left_to_the_full_check(tmp_path) -> None:
    args = argparse.Namespace(model=str(tmp_path / "absent"), blocks=(0, 99), num_blocks=None)
    cli.check_blocks_early(args)  # a hub name, a manifest, a swarm name: checked after loading the config
    (tmp_path / "config.json").write_text("[1, 2]")
    cli.check_blocks_early(argparse.Namespace(model=str(tmp_path), blocks=(0, 99), num_blocks=None))
    (tmp_path / "config.json").write_text("{not json")
    cli.check_blocks_early(argparse.Namespace(model=str(tmp_path), blocks=(0, 99), num_blocks=None))


def test_check_blocks_rules() -> None:
    check_blocks(0, 1, None, 1)
    with pytest.raises(ValueError):
        check_blocks(1, 1, None, 4)
    with pytest.raises(ValueError):
        check_blocks(None, None, 0, 4)


def test_errors_of_the_heavy_modules_are_reported_once_they_are_loaded() -> None:
    import biopetals.node.server  # noqa: F401  (imports every heavy module, as the node does)
    from biopetals.models.config import ModelConfigError
    from biopetals.node.adapters import AdapterError
    from biopetals.node.quant import QuantError
    from biopetals.weights.fetch import FetchError

    expected = cli._expected()
    for error in (ModelConfigError, AdapterError, QuantError, FetchError, OSError, ValueError):
        assert error in expected
