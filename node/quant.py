"""Weight quantisation of a loaded span (``--quant int8|nf4``) through bitsandbytes.

Each ``nn.Linear`` of the decoder layers is replaced by bitsandbytes'
``Linear8bitLt`` (int8) or ``Linear4bit`` (nf4) holding the same weights. Norms and
the rotary embedding stay in the compute dtype. bitsandbytes is optional: without
it, or without a backend for the device, ``quantize_span`` raises ``QuantError``
with what to do.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QUANT_MODES", "QuantError", "quantize_span"]

QUANT_MODES = ("none", "int8", "nf4")


class QuantError(RuntimeError):
    """Quantisation was asked for but cannot be done here."""


def _bnb():
    try:
        import bitsandbytes as bnb  # noqa: PLC0415 - optional dependency
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantError(
            f"--quant needs bitsandbytes, which is not usable here ({type(exc).__name__}: {exc}); "
            "install it (pip install bitsandbytes) or run with --quant none"
        ) from None
    return bnb


def _replace(module: nn.Module, make) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
            count += 1
        else:
            count += _replace(child, make)
    return count


def quantize_span(span: nn.Module, mode: str) -> int:
    """Quantise every linear layer of ``span.layers`` in place; returns how many were replaced."""
    if mode == "none":
        return 0
    if mode not in QUANT_MODES:
        raise QuantError(f"unknown quantisation {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    bnb = _bnb()
    device = span.device
    dtype = span.dtype

    def make(linear: nn.Linear) -> nn.Module:
        bias = linear.bias is not None
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=0.0)
            q.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu", torch.float16 if dtype == torch.float32 else dtype), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if bias:
            q.bias = nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
        try:
            return q.to(device)
        except Exception as exc:
            raise QuantError(f"bitsandbytes cannot quantise to {mode} on {device}: {exc}") from None

    try:
        return _replace(span.layers, make)
    except QuantError:
        raise
    except Exception as exc:
        raise QuantError(f"bitsandbytes failed to quantise to {mode} on {device}: {type(exc).__name__}: {exc}") from None
