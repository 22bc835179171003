"""The client library: routing, inference sessions, forward/backward, generate().

    from biopetals.client import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(
        "path/to/model", initial_peers=["/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."], swarm_key="lab.key")
    out = model.generate(input_ids, max_new_tokens=32)

The names below load on first use (PEP 562), so that ``import biopetals.client.status`` (a
program) can set its process environment before torch and OpenSSL load. Importing this package
changes nothing in the process: a program that runs a client next to nodes on the same cores
should set ``OMP_WAIT_POLICY=PASSIVE`` before torch loads, as the programs of this project do
(``biopetals.protocol.program_env``; spec/README.md §2).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module (of this package) that defines it
_EXPORTS = {
    "AutoDistributedModelForCausalLM": "auto",
    "DistributedLlamaForCausalLM": "model",
    "RemoteCache": "model",
    "DistributedLlamaForCausalLMWithPrompts": "ptune",
    "DistributedLlamaForSequenceClassification": "classification",
    "AutoDistributedModelForSequenceClassification": "classification",
    "InferenceSession": "session",
    "ClientConfig": "swarm",
    "MissingBlocksError": "errors",
    "SwarmError": "errors",
    "RollbackUnsupportedError": "errors",
    "UnsupportedTransformersError": "generation_contract",
    "ServerSpan": "routing",
    "find_route": "routing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
