"""Field kinds of the node protocol's message bodies: how one field is checked, decoded, encoded.

See spec/messages.md §1.1 (types), §2.5 step 7 (the order of checks) and §8 (tensor
shape rules). Each message dataclass declares its fields with ``wire(key, kind)``;
``biopetals.protocol.messages`` walks those tables, so no message has hand-written
encode/decode code.

A kind signals a broken rule with ``Violation`` (an ErrorCode and a text). The caller
turns it into ``RemoteProtocolError`` when it decodes a peer's bytes, or into
``LocalProtocolError`` when our own code constructs an invalid message.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import torch

from biopetals.protocol.errors import ErrorCode, ProtocolError
from biopetals.protocol.identity import PeerId
from biopetals.protocol.limits import (
    MAX_BATCH,
    MAX_BLOCKS,
    MAX_HIDDEN_SIZE,
    MAX_SEQUENCE_LENGTH,
)
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.tensors import Codec, decode_tensor, encode_tensor

__all__ = [
    "Violation",
    "Kind",
    "UInt",
    "ErrorCodeKind",
    "Float",
    "Text",
    "Blob",
    "PeerIdText",
    "MultiaddrText",
    "CodecName",
    "ArrayOf",
    "Nested",
    "TensorKind",
    "PaddingMask",
    "ACTIVATIONS",
    "PROMPTS",
    "MASK",
    "WireField",
    "wire",
    "U64_MAX",
]

U64_MAX: Final = (1 << 64) - 1

#: Codec used for a tensor field when the encoder is given none: lossless for the dtype.
_CODEC_FOR_DTYPE: Final = {
    torch.float64: Codec.F32,
    torch.float32: Codec.F32,
    torch.bfloat16: Codec.BF16,
    torch.float16: Codec.F16,
}


class Violation(Exception):
    """A broken rule found while checking a field (internal; never escapes the codecs)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Kind:
    """One kind of field. ``absent`` is the Python value of an omitted optional field."""

    absent: Any = None

    def decode(self, raw: object) -> Any:
        """Wire value (as msgpack built it) to Python value: type, range, nested rules."""
        raise NotImplementedError

    def check(self, value: object) -> Any:
        """Validate (and normalise) a Python value given to a message constructor."""
        raise NotImplementedError

    def encode(self, value: Any, codec: Codec | None) -> object:
        """Python value to a msgpack-ready value, canonical (spec/messages.md §2.3)."""
        return value


@dataclass(frozen=True)
class UInt(Kind):
    """``uint`` in ``[lo, hi]``; ``low``/``high`` are the codes for a value below/above."""

    lo: int = 0
    hi: int = U64_MAX
    low: ErrorCode = ErrorCode.INVALID_FIELD
    high: ErrorCode = ErrorCode.INVALID_FIELD

    def decode(self, raw: object) -> int:
        if type(raw) is not int:  # bool is an int subclass; it is not a msgpack int
            raise Violation(ErrorCode.INVALID_FIELD, f"expected an unsigned integer, got {_kind(raw)}")
        if raw < self.lo:
            raise Violation(self.low, f"{raw} < minimum {self.lo}")
        if raw > self.hi:
            raise Violation(self.high, f"{raw} > maximum {self.hi}")
        return raw

    def check(self, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return self.decode(int(value))
        return self.decode(value)


@dataclass(frozen=True)
class ErrorCodeKind(UInt):
    """An error code: a ``uint``; known numbers become ``ErrorCode``, unknown ones stay ints."""

    def decode(self, raw: object) -> int:
        number = super().decode(raw)
        try:
            return ErrorCode(number)
        except ValueError:
            return number  # a code from a newer peer (spec/messages.md §2.4)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return int(value)


@dataclass(frozen=True)
class Float(Kind):
    """``float``, finite, ``>= lo`` (or ``> lo`` when ``exclusive``)."""

    lo: float = 0.0
    exclusive: bool = False

    def decode(self, raw: object) -> float:
        if type(raw) is not float:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a float, got {_kind(raw)}")
        if not math.isfinite(raw):
            raise Violation(ErrorCode.INVALID_FIELD, f"{raw} is not finite")
        if raw < self.lo or (self.exclusive and raw == self.lo):
            relation = ">" if self.exclusive else ">="
            raise Violation(ErrorCode.INVALID_FIELD, f"{raw} is not {relation} {self.lo}")
        return raw

    def check(self, value: object) -> float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return self.decode(value)


@dataclass(frozen=True)
class Text(Kind):
    """``str`` of ``lo..hi`` UTF-8 bytes."""

    lo: int
    hi: int
    low: ErrorCode = ErrorCode.INVALID_FIELD
    high: ErrorCode = ErrorCode.LIMIT_EXCEEDED

    def decode(self, raw: object) -> str:
        if type(raw) is not str:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a str, got {_kind(raw)}")
        try:
            size = len(raw.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: only a local caller can produce them
            raise Violation(ErrorCode.INVALID_FIELD, "string is not valid UTF-8") from None
        if size < self.lo:
            raise Violation(self.low, f"string of {size} bytes < minimum {self.lo}")
        if size > self.hi:
            raise Violation(self.high, f"string of {size} bytes > maximum {self.hi}")
        return raw

    check = decode


@dataclass(frozen=True)
class PeerIdText(Text):
    """A peer id as base58btc text (spec/transport.md §1.3); Python value: ``PeerId``."""

    def decode(self, raw: object) -> PeerId:
        return _parse(_peer_id_from_text, Text.decode(self, raw))

    def check(self, value: object) -> PeerId:
        return value if isinstance(value, PeerId) else self.decode(value)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return str(value)


@dataclass(frozen=True)
class MultiaddrText(Text):
    """A multiaddr as text (spec/transport.md §1.7); Python value: ``Multiaddr``."""

    def decode(self, raw: object) -> Multiaddr:
        return _parse(_multiaddr_from_text, Text.decode(self, raw))

    def check(self, value: object) -> Multiaddr:
        return value if isinstance(value, Multiaddr) else self.decode(value)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return str(value)


# Every step of a push chain names the same few peers: parsing a peer id (base58 and key
# checks, ~150 us) once per distinct text keeps it off the per-token path. Both parsers
# are pure; errors are not cached, so bad input costs the same every time.
_peer_id_from_text = functools.lru_cache(maxsize=1024)(PeerId.from_base58)
_multiaddr_from_text = functools.lru_cache(maxsize=1024)(Multiaddr.parse)


def _parse(parser: Callable[[str], Any], text: str) -> Any:
    try:
        return parser(text)
    except ProtocolError as exc:  # the transport's parsers say INVALID_FIELD
        raise Violation(ErrorCode(exc.code), exc.message) from None


@dataclass(frozen=True)
class Blob(Kind):
    """``bin`` of ``lo..hi`` bytes."""

    lo: int
    hi: int
    low: ErrorCode = ErrorCode.INVALID_FIELD
    high: ErrorCode = ErrorCode.LIMIT_EXCEEDED

    def decode(self, raw: object) -> bytes:
        if type(raw) is not bytes:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected bin, got {_kind(raw)}")
        if len(raw) < self.lo:
            raise Violation(self.low, f"{len(raw)} bytes < minimum {self.lo}")
        if len(raw) > self.hi:
            raise Violation(self.high, f"{len(raw)} bytes > maximum {self.hi}")
        return raw

    def check(self, value: object) -> bytes:
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        return self.decode(value)


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
class ArrayOf(Kind):
    """``array<item>`` of at most ``hi`` items; Python value: a tuple (empty when absent)."""

    item: Kind
    hi: int
    high: ErrorCode = ErrorCode.LIMIT_EXCEEDED
    absent: Any = ()

    def decode(self, raw: object) -> tuple:
        if type(raw) is not list:
            raise Violation(ErrorCode.INVALID_FIELD, f"expected an array, got {_kind(raw)}")
        return self._items(raw, self.item.decode)

    def check(self, value: object) -> tuple:
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a sequence, got {_kind(value)}")
        return self._items(value, self.item.check)

    def _items(self, items: list | tuple, convert: Callable[[object], Any]) -> tuple:
        if len(items) > self.hi:
            raise Violation(self.high, f"{len(items)} items > maximum {self.hi}")
        out = []
        for index, item in enumerate(items):
            try:
                out.append(convert(item))
            except Violation as exc:
                raise Violation(exc.code, f"[{index}]: {exc.message}") from None
        return tuple(out)

    def encode(self, value: Any, codec: Codec | None) -> object:
        return [self.item.encode(item, codec) for item in value]


@dataclass(frozen=True)
class Nested(Kind):
    """A nested map with its own field table (a ``Hop``): ``cls`` is a messages.py ``WireStruct``."""

    cls: type

    def decode(self, raw: object) -> Any:
        if not isinstance(raw, dict):
            raise Violation(ErrorCode.INVALID_FIELD, f"expected a map, got {_kind(raw)}")
        return self.cls._decode_body(raw)

    def check(self, value: object) -> Any:
        if not isinstance(value, self.cls):  # it validated itself when constructed
            raise Violation(ErrorCode.INVALID_FIELD, f"expected {self.cls.__name__}, got {_kind(value)}")
        return value

    def encode(self, value: Any, codec: Codec | None) -> object:
        return value._encode_body(codec)


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


@dataclass(frozen=True)
class WireField:
    """One row of a message's field table: msgpack key, attribute name, kind."""

    key: int
    name: str
    kind: Kind
    optional: bool


def wire(key: int, kind: Kind, *, optional: bool = False) -> Any:
    """Declare a dataclass attribute as body key ``key`` (spec/messages.md, the body tables)."""
    metadata = {"wire": (key, kind, optional)}
    if optional:
        return dataclasses.field(default=kind.absent, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def _kind(value: object) -> str:
    return type(value).__name__
