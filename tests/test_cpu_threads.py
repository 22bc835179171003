"""CPU thread settings of nodes and clients: OpenMP threads sleep when idle, node thread count option.

Why it matters (measured on a 2-core machine shared with other work): with OpenMP's
default wait policy, the idle threads of one process spin on the cores another needs,
and a SmolLM2 decode step of a node cost 730 ms of CPU instead of 48 ms. node/cli.py and
the client programs (client/demo.py, ...) therefore set ``OMP_WAIT_POLICY=PASSIVE`` before torch
loads OpenMP (protocol/program_env.py); importing the client library sets nothing.
"""

from __future__ import annotations

import threading

import torch

from biopetals.node.backend import set_threads
from biopetals.node.cli import build_parser
from support_env import env_when_imported

def _policy_when_torch_loads(module: str, env_policy: str | None = None) -> str:
    """OMP_WAIT_POLICY when ``module`` first imports torch (libgomp reads it then)."""
    return env_when_imported(module, "torch", "OMP_WAIT_POLICY", env_policy)


def test_node_cli_sets_passive_wait_policy_before_torch_loads() -> None:
    # node/cli.py imports torch only once its network is open (node/server.py): imported after it, as then
    assert _policy_when_torch_loads("biopetals.node.cli, biopetals.node.server") == "PASSIVE"


def test_client_programs_set_passive_wait_policy_before_torch_loads() -> None:
    # The demo loads the client library (and torch) in main(): imported after the program, as then.
    assert _policy_when_torch_loads("biopetals.client.demo, biopetals.client.model") == "PASSIVE"
    assert _policy_when_torch_loads("biopetals.api.cli, biopetals.api.engine") == "PASSIVE"


def test_the_client_library_leaves_the_wait_policy_alone() -> None:
    assert _policy_when_torch_loads("biopetals.client.model") == "None"


def test_an_explicit_wait_policy_is_kept() -> None:
    assert _policy_when_torch_loads("biopetals.node.cli, biopetals.node.server", "ACTIVE") == "ACTIVE"


def test_num_threads_option() -> None:
    parser = build_parser()
    base = ["--model", "m", "--blocks", "0:1", "--swarm-key", "k", "--new-swarm"]
    assert parser.parse_args(base).num_threads == 0
    assert parser.parse_args(base + ["--num-threads", "1"]).num_threads == 1
    assert "--num-threads" in parser.format_help()


def test_set_threads_applies_in_the_calling_thread() -> None:
    before = torch.get_num_threads()
    seen: list[int] = []

    def worker() -> None:
        set_threads(1)
        seen.append(torch.get_num_threads())
        set_threads(0)  # 0 leaves it alone
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    try:
        assert seen == [1, 1]
    finally:
        torch.set_num_threads(before)
