"""Field kinds of the node protocol's message bodies: how one field is checked, decoded, encoded.

See spec/messages.md §1.1 (types), §2.5 step 7 (the order of checks) and §8 (tensor
shape rules). Each message dataclass declares its fields with ``wire(key, kind)``;
``biopetals.protocol.table.WireStruct`` walks those tables, so no message has hand-written
encode/decode code. The scalar kinds are defined in protocol/table.py (torch-free, shared with
the DHT and the handshake); the tensor kinds (and codec names) are here.

A kind signals a broken rule with ``Violation`` (an ErrorCode and a text). The caller
turns it into ``RemoteProtocolError`` when it decodes a peer's bytes, or into
``LocalProtocolError`` when our own code constructs an invalid message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import torch

from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.limits import (
    MAX_BATCH,
    MAX_BLOCKS,
    MAX_HIDDEN_SIZE,
    MAX_SEQUENCE_LENGTH,
)
from biopetals.protocol.table import Kind, Violation, _kind
from biopetals.protocol.tensors import Codec, decode_tensor, encode_tensor

__all__ = ["CodecName", "TensorKind", "PaddingMask", "ACTIVATIONS", "PROMPTS", "MASK"]

#: Codec used for a tensor field when the encoder is given none: lossless for the dtype.
_CODEC_FOR_DTYPE: Final = {
    torch.float64: Codec.F32,
    torch.float32: Codec.F32,
    torch.bfloat16: Codec.BF16,
    torch.float16: Codec.F16,
}


@dataclass(frozen=True)
class CodecName(Kind):
    """A ``str`` naming a tensor codec of spec/tensors.md §4; unknown names are ``DTYPE_MISMATCH``."""

    def decode(self, raw: object) -> Codec:
        if type(raw) is not str:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a codec name (str), got {_kind(raw)}")
        return self.check(raw)

    def check(self, value: object) -> Codec:
        try:
            return Codec(value)
        except ValueError:
            raise Violation(ErrorCode.DTYPE_MISMATCH, f"unknown tensor codec {value!r:.40}") from None

    def encode(self, value: Any, codec: Codec | None) -> object:
        return value.value


@dataclass(frozen=True)
class TensorKind(Kind):
    """A tensor (spec/tensors.md §3) with the rank and dimension ranges of spec/messages.md §8."""

    what: str
    dims: tuple[tuple[str, int], ...]  # (name, maximum) per dimension; the minimum is 1

    def decode(self, raw: object) -> torch.Tensor:
        try:
            tensor = decode_tensor(raw)
        except ProtocolError as exc:
            raise Violation(ErrorCode(exc.code), exc.message) from None
        return self._check_tensor(tensor)

    def check(self, value: object) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise Violation(ErrorCode.INVALID_TENSOR, f"expected a torch.Tensor, got {_kind(value)}")
        if value.dtype not in _CODEC_FOR_DTYPE:
            raise Violation(ErrorCode.INVALID_TENSOR, f"{self.what} must be floating point, got {value.dtype}")
        return self._check_tensor(value)

    def _check_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = tuple(tensor.shape)
        if len(shape) != len(self.dims):
            names = ", ".join(name for name, _ in self.dims)
            raise Violation(ErrorCode.INVALID_TENSOR, f"{self.what} must be [{names}], got shape {list(shape)}")
        for size, (name, maximum) in zip(shape, self.dims):
            if size < 1:
                raise Violation(ErrorCode.INVALID_TENSOR, f"{self.what} {name} dimension is 0")
            if size > maximum:
                raise Violation(ErrorCode.LIMIT_EXCEEDED, f"{self.what} {name} dimension {size} > maximum {maximum}")
        # spec/messages.md §7.3: no NaN or infinity in any message.
        if not _all_finite(tensor):
            raise Violation(ErrorCode.NON_FINITE, f"{self.what} contains NaN or infinity")
        return tensor

    def encode(self, value: Any, codec: Codec | None) -> object:
        return encode_tensor(value, codec if codec is not None else _CODEC_FOR_DTYPE[value.dtype])


@dataclass(frozen=True)
class PaddingMask(Kind):
    """A padding mask: ``bin``, one byte per token, row-major ``[batch, tokens]``, each 0 or 1.

    See spec/messages.md §8.1. Python value: a ``torch.bool`` tensor (``[batch * tokens]``
    as decoded; the message's cross-field rule checks the length against ``hidden`` and
    reshapes it to ``[batch, tokens]``). A constructor takes a bool or integer tensor of
    0/1 values.
    """

    hi: int

    def decode(self, raw: object) -> torch.Tensor:
        if type(raw) is not bytes:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected bin, got {_kind(raw)}")
        if len(raw) < 1:
            raise Violation(ErrorCode.INVALID_FIELD, "0 bytes < minimum 1")
        if len(raw) > self.hi:  # the frame limit bounds it already; stated for other receivers
            raise Violation(ErrorCode.LIMIT_EXCEEDED, f"{len(raw)} bytes > maximum {self.hi}")
        values = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if bool((values > 1).any()):
            bad = int(values[values > 1][0])
            raise Violation(ErrorCode.INVALID_FIELD, f"a byte is {bad}; each must be 0 (padding) or 1 (token)")
        return values.bool()

    def check(self, value: object) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a torch.Tensor, got {_kind(value)}")
        if value.dtype.is_floating_point or value.dtype.is_complex:
            raise Violation(ErrorCode.INVALID_FIELD, f"mask must be bool or integer, got {value.dtype}")
        if value.ndim != 2 or value.numel() < 1:
            raise Violation(ErrorCode.INVALID_TENSOR, f"mask must be [batch, tokens], got shape {list(value.shape)}")
        if value.numel() > self.hi:
            raise Violation(ErrorCode.LIMIT_EXCEEDED, f"mask of {value.numel()} tokens > maximum {self.hi}")
        if value.dtype != torch.bool and bool(((value != 0) & (value != 1)).any()):
            raise Violation(ErrorCode.INVALID_FIELD, "mask values must be 0 (padding) or 1 (token)")
        return value.detach().to(device="cpu", dtype=torch.bool)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return value.to(torch.uint8).contiguous().numpy().tobytes()


def _all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or infinite.

    A float32 sum is NaN or infinite whenever an element is (inf + x stays inf,
    inf - inf is NaN), and costs a fraction of ``isfinite`` on f16/bf16 here. Only
    when the sum is not finite (a bad element, or finite values overflowing float32)
    is the exact elementwise check needed.
    """
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


_BATCH = ("batch", MAX_BATCH)
_HIDDEN = ("hidden", MAX_HIDDEN_SIZE)
#: ``[batch, tokens, hidden]`` (spec/messages.md §8).
ACTIVATIONS: Final = TensorKind("activations", (_BATCH, ("tokens", MAX_SEQUENCE_LENGTH), _HIDDEN))
#: ``[blocks, batch, prefix, hidden]`` (spec/messages.md §8).
PROMPTS: Final = TensorKind(
    "prompts", (("blocks", MAX_BLOCKS), _BATCH, ("prefix", MAX_SEQUENCE_LENGTH), _HIDDEN)
)
#: ``[batch, tokens]`` padding mask of the step's or request's tokens (spec/messages.md §8.1).
MASK: Final = PaddingMask(MAX_BATCH * MAX_SEQUENCE_LENGTH)
