"""The client library: routing, inference sessions, forward/backward, generate().

    from biopetals.client import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(
        "path/to/model", initial_peers=["/ip4/10.0.0.5/tcp/31337/p2p/12D3KooW..."], swarm_key="lab.key")
    out = model.generate(input_ids, max_new_tokens=32)
"""

from .errors import MissingBlocksError, SwarmError
from .model import AutoDistributedModelForCausalLM, DistributedLlamaForCausalLM, RemoteCache
from .routing import ServerSpan, find_route
from .session import InferenceSession
from .swarm import ClientConfig

__all__ = [
    "AutoDistributedModelForCausalLM",
    "DistributedLlamaForCausalLM",
    "RemoteCache",
    "InferenceSession",
    "ClientConfig",
    "MissingBlocksError",
    "SwarmError",
    "ServerSpan",
    "find_route",
]
