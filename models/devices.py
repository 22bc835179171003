"""Which torch device and dtype a node (or client) computes with: ``--device auto`` and ``--dtype auto``.

``auto`` picks CUDA when a GPU is present, then Apple's MPS, else the CPU; ``cuda:N``
chooses a GPU. The dtype follows the device: bfloat16 on a GPU that supports it, else
float16 (older CUDA GPUs, MPS); float32 on a CPU (bf16/fp16 matmuls are slow there and
fp32 is the reference the exactness tests use).

The rules are plain functions of an ``Accelerators`` value, so they are tested on a
machine without a GPU; ``Accelerators.detect()`` is the one place that asks torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Accelerators", "DeviceError", "choose_device", "choose_dtype", "describe"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


class DeviceError(ValueError):
    """A ``--device``/``--dtype`` this machine cannot honour (the message says what it has)."""


@dataclass(frozen=True)
class Accelerators:
    """What this machine offers: CUDA GPUs (and whether each supports bf16), Apple's MPS."""

    cuda_bf16: tuple[bool, ...] = ()  # one entry per visible CUDA GPU
    mps: bool = False
    cuda_names: tuple[str, ...] = ()

    @property
    def cuda_count(self) -> int:
        return len(self.cuda_bf16)

    @classmethod
    def detect(cls) -> Accelerators:
        """Ask torch (the only function here that does)."""
        import torch

        bf16: list[bool] = []
        names: list[str] = []
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                major, _minor = torch.cuda.get_device_capability(i)
                bf16.append(major >= 8)  # Ampere and later compute in bf16 natively
                names.append(torch.cuda.get_device_name(i))
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return cls(tuple(bf16), mps, tuple(names))


def choose_device(requested: str, acc: Accelerators) -> str:
    """``auto`` -> ``cuda:0``, else ``mps``, else ``cpu``; an explicit choice is checked against ``acc``."""
    text = requested.strip().lower()
    if text == "auto":
        if acc.cuda_count:
            return "cuda:0"
        return "mps" if acc.mps else "cpu"
    if text == "cpu":
        return "cpu"
    if text == "mps":
        if not acc.mps:
            raise DeviceError("--device mps: this machine has no Apple MPS device (use --device auto or cpu)")
        return "mps"
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text[5:] if text.startswith("cuda:") else "0"
        if not index_text.isdigit():
            raise DeviceError(f"--device {requested}: expected cuda:N with N a GPU number, e.g. cuda:0")
        index = int(index_text)
        if not acc.cuda_count:
            raise DeviceError(f"--device {requested}: no CUDA GPU is visible to torch here (use --device auto or cpu; "
                              "check the driver, CUDA_VISIBLE_DEVICES, and that torch was installed with CUDA)")
        if index >= acc.cuda_count:
            raise DeviceError(f"--device {requested}: only {acc.cuda_count} CUDA GPU(s) visible, cuda:0 to "
                              f"cuda:{acc.cuda_count - 1}")
        return f"cuda:{index}"
    raise DeviceError(f"--device {requested}: expected {DEVICE_CHOICES}")


def choose_dtype(requested: str, device: str, acc: Accelerators) -> str:
    """``auto`` -> bfloat16 on a CUDA GPU that supports it, float16 on other GPUs and MPS, float32 on CPU."""
    if requested != "auto":
        if requested == "bfloat16" and device.startswith("cuda") and not acc.cuda_bf16[_index(device)]:
            raise DeviceError(f"--dtype bfloat16: {device} does not support bf16 (use --dtype float16 or auto)")
        return requested
    if device.startswith("cuda"):
        return "bfloat16" if acc.cuda_bf16[_index(device)] else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def describe(device: str, dtype: str, acc: Accelerators) -> str:
    """One line for the node's start-up output, e.g. ``device cuda:0 (NVIDIA H100), bfloat16``."""
    name = ""
    if device.startswith("cuda") and acc.cuda_names:
        name = f" ({acc.cuda_names[_index(device)]})"
    elif device == "mps":
        name = " (Apple MPS)"
    return f"device {device}{name}, {dtype}"


def _index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0
