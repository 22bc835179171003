"""Server-side LoRA adapters: loaded from peft directories for the served blocks, applied per request.

See spec/messages.md §6.3. ``biopetals-node --adapters bio=/path/to/peft-dir`` loads
``adapter_config.json`` and ``adapter_model.safetensors`` (as ``PeftModel.save_pretrained``
writes them), keeps only the tensors of the served blocks (keys ``…layers.<i>.<module>.lora_A/B.weight``)
and wraps each adapted linear layer of those blocks in a ``LoraLinear``, which adds
``scale * B(A(x))`` when its adapter is the active one - what peft's ``LoraLayer`` does in
evaluation mode (no dropout). Several adapters share the wrappers; ``AdapterSet.use(name)``
selects one for a computation (the node computes on one worker thread, so one active
adapter at a time is exact). With none active the blocks are the base model.

Refused at start-up with ``AdapterError`` (the node does not start): anything but plain
LoRA (DoRA, ``bias`` other than ``"none"``, ``fan_in_fan_out``, per-module rank or alpha
patterns, adapted embeddings or ``modules_to_save`` inside the blocks), tensors of the
wrong shape for their layer, and an adapter with no tensor for the served blocks.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from biopetals.protocol.limits import MAX_ADAPTERS, MAX_LABEL_BYTES

__all__ = ["AdapterError", "AdapterSet", "LoraLinear", "parse_adapter_arg"]

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")
_FILES = ("adapter_model.safetensors",)


class AdapterError(ValueError):
    """An adapter that cannot be loaded or applied; the message says why."""


def parse_adapter_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` of ``--adapters``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise AdapterError(f"{text!r}: expected NAME=PATH, e.g. bio=/models/bio-lora")
    if len(name.encode()) > MAX_LABEL_BYTES:
        raise AdapterError(f"adapter name {name!r} longer than {MAX_LABEL_BYTES} bytes")
    return name, Path(path)


@dataclass(frozen=True)
class _Lora:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


class LoraLinear(nn.Module):
    """A linear layer plus the LoRA update of the active adapter, if it has one for this layer."""

    def __init__(self, base: nn.Module, adapters: "AdapterSet") -> None:
        super().__init__()
        self.base = base
        self.adapters = adapters
        self.lora: dict[str, _Lora] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        lora = self.lora.get(self.adapters.active) if self.adapters.active is not None else None
        if lora is None:
            return out
        # peft's order: lora_B(lora_A(x)) * scaling, in the adapter's dtype
        delta = nn.functional.linear(nn.functional.linear(x.to(lora.a.dtype), lora.a), lora.b) * lora.scale
        return out + delta.to(out.dtype)


class AdapterSet:
    """The adapters of one node's blocks and the one in use now."""

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.active: str | None = None

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[None]:
        """Run the blocks with adapter ``name`` (None: the base model) inside the block."""
        if name is not None and name not in self.names:
            raise AdapterError(f"adapter {name!r} is not loaded")
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous

    def load(self, name: str, path: Path, layers: nn.ModuleList, start: int, dtype: torch.dtype,
             device: torch.device) -> int:
        """Load adapter ``name`` from ``path`` into ``layers`` (blocks ``start ..``); returns the tensors applied."""
        if name in self.names:
            raise AdapterError(f"adapter {name!r} given twice")
        if len(self.names) >= MAX_ADAPTERS:
            raise AdapterError(f"at most {MAX_ADAPTERS} adapters per node")
        scale = _scale(_config(path))
        pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        end = start + len(layers)
        with safe_open(str(_weights(path)), framework="pt") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None:
                    if re.search(r"(?:^|\.)layers\.(\d+)\.", key) and _served(key, start, end):
                        raise AdapterError(f"{path}: {key}: only LoRA A/B weights are supported inside the blocks")
                    continue  # e.g. LoRA on the embeddings or the head: the client's part, not ours
                block, module, which = int(m.group(1)), m.group(2), m.group(3)
                if start <= block < end:
                    pairs.setdefault((block, module), {})[which] = f.get_tensor(key)
        if not pairs:
            raise AdapterError(f"{path}: no LoRA tensors for blocks {start}:{end}")
        for (block, module), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{path}: block {block} {module}: lora_A and lora_B must both be present")
            self._attach(name, layers[block - start], block, module, ab["A"], ab["B"], scale, dtype, device)
        self.names = self.names + (name,)
        return 2 * len(pairs)

    def _attach(self, name: str, layer: nn.Module, block: int, module: str, a: torch.Tensor, b: torch.Tensor,
                scale: float, dtype: torch.dtype, device: torch.device) -> None:
        try:
            target = layer.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"block {block} has no module {module!r}") from None
        if not isinstance(target, LoraLinear):
            parent_name, _, attr = module.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            target = LoraLinear(target, self)
            setattr(parent, attr, target)
        base = target.base
        shape_in, shape_out = getattr(base, "in_features", None), getattr(base, "out_features", None)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (a.shape[1], b.shape[0]) != (shape_in, shape_out):
            raise AdapterError(f"block {block} {module}: LoRA shapes A {list(a.shape)}, B {list(b.shape)} do not fit "
                               f"a {shape_in} -> {shape_out} layer")
        target.lora[name] = _Lora(a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), scale)


def _served(key: str, start: int, end: int) -> bool:
    m = re.search(r"(?:^|\.)layers\.(\d+)\.", key)
    return m is not None and start <= int(m.group(1)) < end


def _weights(path: Path) -> Path:
    for name in _FILES:
        if (path / name).is_file():
            return path / name
    raise AdapterError(f"{path}: no adapter_model.safetensors (save the adapter with peft's save_pretrained)")


def _config(path: Path) -> dict:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}/adapter_config.json: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterError(f"{path}: unsupported LoRA options: {', '.join(bad)}")
    return config


def _scale(config: dict) -> float:
    """peft's ``scaling``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise AdapterError(f"adapter_config.json: r={r!r}, lora_alpha={alpha!r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)
