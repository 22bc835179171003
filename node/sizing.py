"""How many blocks a node serves when told neither ``--blocks`` nor ``--num-blocks``.

``default_num_blocks``: as many blocks as fit in 80 % of the device's free memory, each
block counted with its weights (from the config's shapes, at the compute dtype or the
quantised width) and its share of the KV-cache budget (``--max-cache-tokens`` tokens over
every served block); at least 1, at most the model's blocks. Free memory: ``MemAvailable``
of /proc/meminfo on a CPU, ``torch.cuda.mem_get_info`` on a GPU.
"""

from __future__ import annotations

import os

import torch
from transformers import PretrainedConfig

from biopetals.models.blocks import DTYPES, head_dim, kv_cache_bytes

__all__ = ["USABLE_FRACTION", "block_bytes", "free_memory", "default_num_blocks"]

#: Share of the free memory the default fills (the rest: activations, the process, the OS).
USABLE_FRACTION = 0.8
_QUANT_BYTES = {"none": None, "int8": 1.0, "nf4": 0.5}


def block_bytes(config: PretrainedConfig, dtype: str = "float32", quant: str = "none") -> int:
    """Bytes of one decoder block's weights: attention, MLP and the two norms."""
    hidden = int(config.hidden_size)
    heads, kv_heads, hd = int(config.num_attention_heads), int(config.num_key_value_heads), head_dim(config)
    matrices = hidden * heads * hd * 2 + hidden * kv_heads * hd * 2 + 3 * hidden * int(config.intermediate_size)
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    width = _QUANT_BYTES.get(quant) or elem
    return int(matrices * width + 2 * hidden * elem)


def free_memory(device: str = "cpu") -> int:
    """Bytes free now on ``device`` (``cpu``, ``cuda[:N]`` or ``mps``)."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device == "mps":  # unified memory: what Metal recommends, less what it holds already
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_num_blocks(config: PretrainedConfig, *, free: int, dtype: str = "float32", quant: str = "none",
                       max_cache_tokens: int = 16384) -> int:
    """Blocks that fit in ``USABLE_FRACTION`` of ``free`` bytes, weights and KV cache (see the module doc)."""
    n_layers = int(config.num_hidden_layers)
    per_block = block_bytes(config, dtype, quant) + kv_cache_bytes(config, 1, DTYPES[dtype], tokens=max_cache_tokens)
    return max(1, min(n_layers, int(free * USABLE_FRACTION) // per_block))
