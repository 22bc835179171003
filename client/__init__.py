"""The client library: routing, inference sessions, forward/backward, generate().

    from biopetals.client import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(
        "path/to/model", initial_peers=["/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."], swarm_key="lab.key")
    out = model.generate(input_ids, max_new_tokens=32)
"""

import os

# Before torch is loaded (if the caller has not loaded it yet): idle OpenMP threads sleep
# instead of spinning. The client mostly waits for the swarm; spinning threads burn the
# cores that nodes on the same machine compute on (measured with a local swarm on 2 cores:
# 11 instead of 23 ms of client CPU per token, 64 instead of 80 ms per token). Set
# OMP_WAIT_POLICY yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import MissingBlocksError, SwarmError  # noqa: E402
from .generation_contract import UnsupportedTransformersError  # noqa: E402
from .model import AutoDistributedModelForCausalLM, DistributedLlamaForCausalLM, RemoteCache  # noqa: E402
from .ptune import DistributedLlamaForCausalLMWithPrompts  # noqa: E402
from .classification import (  # noqa: E402
    AutoDistributedModelForSequenceClassification,
    DistributedLlamaForSequenceClassification,
)
from .routing import ServerSpan, find_route  # noqa: E402
from .session import InferenceSession  # noqa: E402
from .swarm import ClientConfig  # noqa: E402

__all__ = [
    "AutoDistributedModelForCausalLM",
    "DistributedLlamaForCausalLM",
    "DistributedLlamaForCausalLMWithPrompts",
    "DistributedLlamaForSequenceClassification",
    "AutoDistributedModelForSequenceClassification",
    "RemoteCache",
    "InferenceSession",
    "ClientConfig",
    "MissingBlocksError",
    "SwarmError",
    "UnsupportedTransformersError",
    "ServerSpan",
    "find_route",
]
