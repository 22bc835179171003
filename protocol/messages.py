"""The node protocol's messages: one frozen dataclass per message, and their codec.

See spec/messages.md. Each dataclass declares its body table with ``wire(key, kind)``
(the kinds live in ``biopetals.protocol.fields``) and, where the spec has them, its
cross-field rules in ``_check_rules``; ``encode_message`` and ``decode_message`` walk
those tables, so adding a message means adding a dataclass.

- Constructing a message validates it (field ranges, tensor shapes, finiteness,
  cross-field rules) and raises ``LocalProtocolError`` on a bad value: we never build,
  let alone send, a message the spec forbids.
- ``decode_message`` follows the decoding order of spec/messages.md §2.5 and raises
  only ``RemoteProtocolError`` with the code of the first rule broken.

Sans-IO: bytes in, messages out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Final

import torch

from biopetals.protocol.envelope import PROTOCOL_VERSION, pack_envelope, unpack_envelope
from biopetals.protocol.errors import (
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from biopetals.protocol.fields import ACTIVATIONS, MASK, PROMPTS, CodecName
from biopetals.protocol.table import (
    U64_MAX,
    ArrayOf,
    Blob,
    ErrorCodeKind,
    Float,
    MultiaddrText,
    Nested,
    PeerIdText,
    Text,
    UInt,
    Violation,
    WireStruct,
    wire,
)
from biopetals.protocol.limits import (
    MAX_ADAPTERS,
    MAX_BATCH,
    MAX_BLOCKS,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_HIDDEN_SIZE,
    MAX_HOP_ADDRS,
    MAX_HOPS,
    MAX_LABEL_BYTES,
    MAX_MULTIADDR_BYTES,
    MAX_NAME_BYTES,
    MAX_PEER_ID_BYTES,
    MAX_SEQUENCE_LENGTH,
    MAX_SESSION_ID_BYTES,
)
from biopetals.protocol.identity import PeerId
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.protocol.tensors import Codec

__all__ = [
    "Message",
    "Hop",
    "NodeInfoRequest",
    "NodeInfo",
    "OpenSession",
    "SessionOpened",
    "SetUpstream",
    "KeepAlive",
    "Step",
    "StepResult",
    "CloseSession",
    "SessionClosed",
    "Push",
    "PushAck",
    "Forward",
    "ForwardResult",
    "Backward",
    "BackwardResult",
    "Error",
    "MESSAGE_TYPES",
    "FIRST_MESSAGES",
    "SESSION_MESSAGES",
    "REPLY_TO",
    "encode_message",
    "decode_message",
    "decode_from_table",
    "error_from_exception",
]

_LIMIT = ErrorCode.LIMIT_EXCEEDED

# Field kinds shared by several messages (spec/messages.md §4-§7 tables).
SESSION_ID: Final = Blob(1, MAX_SESSION_ID_BYTES)
STEP_ID: Final = UInt(0, U64_MAX)
MODEL: Final = Text(1, MAX_NAME_BYTES)
LABEL: Final = Text(1, MAX_LABEL_BYTES)
BLOCK_START: Final = UInt(0, MAX_BLOCKS - 1)
BLOCK_END: Final = UInt(1, MAX_BLOCKS)
POSITION: Final = UInt(0, MAX_SEQUENCE_LENGTH - 1, low=ErrorCode.BAD_POSITION, high=ErrorCode.BAD_POSITION)
MAX_LENGTH: Final = UInt(1, MAX_SEQUENCE_LENGTH, high=_LIMIT)
BATCH_SIZE: Final = UInt(1, MAX_BATCH, high=_LIMIT)
CODEC: Final = CodecName()
#: A server-side adapter's name (spec/messages.md §4.2, §5.1, §6): a short label.
ADAPTER: Final = LABEL
ADAPTERS: Final = ArrayOf(LABEL, MAX_ADAPTERS)
UPSTREAM: Final = PeerIdText(1, MAX_PEER_ID_BYTES)  # a session's upstream peer (§5.10)
#: A flag (revision 4): present means 1, absent means off; any other value is INVALID_FIELD.
FLAG: Final = UInt(1, 1)


class Message(WireStruct):
    """Base of the messages of spec/messages.md §3; ``TYPE`` is the envelope type code."""

    TYPE: ClassVar[int]


# ----------------------------------------------------------------------------- rules


def _span_rule(start: int, end: int, what: str = "") -> None:
    if start >= end:
        raise Violation(ErrorCode.INVALID_FIELD, f"{what}start {start} must be < end {end}")


def _prompts_rule(prompts: torch.Tensor | None, hidden: torch.Tensor, blocks: int | None) -> None:
    """``prompts`` fits ``hidden`` (spec/messages.md §5.3 rule 2, §6.1): batch, hidden, prefix <= tokens."""
    if prompts is None:
        return
    if blocks is not None and prompts.shape[0] != blocks:
        raise Violation(ErrorCode.INVALID_TENSOR, f"prompts cover {prompts.shape[0]} blocks, the span has {blocks}")
    batch, tokens, hidden_size = hidden.shape
    if prompts.shape[1] != batch or prompts.shape[3] != hidden_size:
        raise Violation(
            ErrorCode.INVALID_TENSOR, f"prompts shape {list(prompts.shape)} does not fit hidden {list(hidden.shape)}"
        )
    if prompts.shape[2] > tokens:
        raise Violation(ErrorCode.INVALID_TENSOR, f"prompts prefix {prompts.shape[2]} > {tokens} tokens")


def _mask_rule(message: "WireStruct", hidden: torch.Tensor) -> None:
    """``mask`` has one entry per token of ``hidden`` (spec/messages.md §8.1), else ``INVALID_TENSOR``.

    Normalises it to ``[batch, tokens]``, and to absent when no token is padding:
    an all-ones mask means what no mask means, and the canonical encoding omits it.
    """
    mask = message.mask  # type: ignore[attr-defined]
    if mask is None:
        return
    batch, tokens = int(hidden.shape[0]), int(hidden.shape[1])
    if mask.ndim == 1 and mask.numel() == batch * tokens:
        mask = mask.reshape(batch, tokens)
    if tuple(mask.shape) != (batch, tokens):
        shape = [mask.numel()] if mask.ndim == 1 else list(mask.shape)
        raise Violation(
            ErrorCode.INVALID_TENSOR, f"mask of {shape} entries does not fit hidden [{batch}, {tokens}, ...]"
        )
    object.__setattr__(message, "mask", None if bool(mask.all()) else mask)


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True, eq=False)
class Hop(WireStruct):
    """One node further down a push chain (spec/messages.md §5.4)."""

    peer_id: PeerId = wire(0, UPSTREAM)
    session_id: bytes = wire(2, SESSION_ID)
    start: int = wire(3, BLOCK_START)
    end: int = wire(4, BLOCK_END)
    addrs: tuple[Multiaddr, ...] = wire(1, ArrayOf(MultiaddrText(1, MAX_MULTIADDR_BYTES), MAX_HOP_ADDRS), optional=True)

    def _check_rules(self) -> None:
        _span_rule(self.start, self.end)
        for index, addr in enumerate(self.addrs):
            if addr.peer_id is not None and addr.peer_id != self.peer_id:
                raise Violation(
                    ErrorCode.INVALID_FIELD, f"addrs[{index}] names peer {addr.peer_id}, not {self.peer_id}"
                )


HOPS: Final = ArrayOf(Nested(Hop), MAX_HOPS)


@dataclass(frozen=True, eq=False)
class NodeInfoRequest(Message):
    """Ask a node what it serves (spec/messages.md §4.1). Empty body."""

    TYPE: ClassVar[int] = 1


@dataclass(frozen=True, eq=False)
class NodeInfo(Message):
    """What a node serves and how fast (spec/messages.md §4.2)."""

    TYPE: ClassVar[int] = 2
    version: str = wire(0, LABEL)
    model: str = wire(1, MODEL)
    start: int = wire(2, BLOCK_START)
    end: int = wire(3, BLOCK_END)
    dtype: str = wire(4, LABEL)
    quant: str = wire(5, LABEL)
    hidden_size: int = wire(6, UInt(1, MAX_HIDDEN_SIZE))
    cache_tokens_left: int = wire(7, UInt(0, U64_MAX))
    inference_tps: float = wire(8, Float())
    forward_tps: float = wire(9, Float())
    # Load, optional (a revision 1 addition; None from a node that does not report it).
    sessions_open: int | None = wire(10, UInt(0, U64_MAX), optional=True)
    decode_steps: int | None = wire(11, UInt(0, U64_MAX), optional=True)
    batched_steps: int | None = wire(12, UInt(0, U64_MAX), optional=True)
    uptime: float | None = wire(13, Float(), optional=True)
    # Server-side adapters this node can apply (a revision 1 addition; empty: none).
    adapters: tuple[str, ...] = wire(14, ADAPTERS, optional=True)
    #: 1: this node's sessions accept ``Step.truncate`` (cache rollback, §5.6; revision 4); None: they do not.
    rollback: int | None = wire(15, FLAG, optional=True)
    #: 1: this node's sessions accept ``KeepAlive`` (§5.9; revision 5); None: they do not.
    keepalive: int | None = wire(16, FLAG, optional=True)

    def _check_rules(self) -> None:
        _span_rule(self.start, self.end)


@dataclass(frozen=True, eq=False)
class OpenSession(Message):
    """Open an inference session over blocks ``[start, end)`` (spec/messages.md §5.1)."""

    TYPE: ClassVar[int] = 3
    model: str = wire(0, MODEL)
    start: int = wire(1, BLOCK_START)
    end: int = wire(2, BLOCK_END)
    max_length: int = wire(3, MAX_LENGTH)
    batch_size: int = wire(4, BATCH_SIZE)
    codec: Codec = wire(5, CODEC)
    session_id: bytes | None = wire(6, SESSION_ID, optional=True)
    adapter: str | None = wire(7, ADAPTER, optional=True)
    #: The one peer whose ``Push`` this session accepts (§5.10); None: no node may push into it.
    upstream: PeerId | None = wire(8, UPSTREAM, optional=True)

    def _check_rules(self) -> None:
        _span_rule(self.start, self.end)


@dataclass(frozen=True, eq=False)
class SessionOpened(Message):
    """The session is open and its cache reserved (spec/messages.md §5.2)."""

    TYPE: ClassVar[int] = 4
    session_id: bytes = wire(0, SESSION_ID)
    idle_timeout: float = wire(1, Float(0.0, exclusive=True))
    #: The session's upstream as the node bound it (§5.10); absent from a node that does not bind.
    upstream: PeerId | None = wire(2, UPSTREAM, optional=True)
    #: 1: the session accepts ``Step.truncate`` (cache rollback, §5.6; revision 4); None: a node that does not.
    rollback: int | None = wire(3, FLAG, optional=True)
    #: 1: the session accepts ``KeepAlive`` (§5.9; revision 5); None: a node that does not.
    keepalive: int | None = wire(4, FLAG, optional=True)


@dataclass(frozen=True, eq=False)
class _StepBody(Message):
    """The body shared by ``Step`` and ``Push`` (spec/messages.md §5.3, §5.7)."""

    session_id: bytes = wire(0, SESSION_ID)
    step_id: int = wire(1, STEP_ID)
    position: int = wire(2, POSITION)
    hidden: torch.Tensor = wire(3, ACTIVATIONS)
    prompts: torch.Tensor | None = wire(4, PROMPTS, optional=True)
    next: tuple[Hop, ...] = wire(5, HOPS, optional=True)
    mask: torch.Tensor | None = wire(6, MASK, optional=True)
    #: 1: cut the session's cache to ``position`` columns before the step (§5.6, revision 4); None: do not.
    truncate: int | None = wire(7, FLAG, optional=True)

    @property
    def tokens(self) -> int:
        """How many new tokens (positions) the step carries."""
        return int(self.hidden.shape[1])

    def _check_rules(self) -> None:
        # §5.3 rules 1-4, in this order.
        if self.position + self.tokens > MAX_SEQUENCE_LENGTH:
            raise Violation(
                ErrorCode.BAD_POSITION,
                f"position {self.position} + {self.tokens} tokens > MAX_SEQUENCE_LENGTH {MAX_SEQUENCE_LENGTH}",
            )
        _prompts_rule(self.prompts, self.hidden, None)
        for index, (hop, following) in enumerate(zip(self.next, self.next[1:])):
            if hop.end != following.start:
                raise Violation(
                    ErrorCode.INVALID_FIELD,
                    f"next[{index}] ends at {hop.end}, next[{index + 1}] starts at {following.start}",
                )
        if self.prompts is not None and self.next:
            covered = self.next[-1].end - self.next[0].start
            if self.prompts.shape[0] <= covered:
                raise Violation(
                    ErrorCode.INVALID_TENSOR,
                    f"prompts cover {self.prompts.shape[0]} blocks, not more than the {covered} blocks of the hops",
                )
        _mask_rule(self, self.hidden)  # rule 5


@dataclass(frozen=True, eq=False)
class Step(_StepBody):
    """Run new tokens through a session's blocks (spec/messages.md §5.3)."""

    TYPE: ClassVar[int] = 5


@dataclass(frozen=True, eq=False)
class Push(_StepBody):
    """A step forwarded by the previous node of the chain (spec/messages.md §5.7)."""

    TYPE: ClassVar[int] = 9


@dataclass(frozen=True, eq=False)
class StepResult(Message):
    """The outputs of a session's last block for one step (spec/messages.md §5.5)."""

    TYPE: ClassVar[int] = 6
    session_id: bytes = wire(0, SESSION_ID)
    step_id: int = wire(1, STEP_ID)
    hidden: torch.Tensor = wire(2, ACTIVATIONS)


@dataclass(frozen=True, eq=False)
class CloseSession(Message):
    """Close a session and free its cache (spec/messages.md §5.8)."""

    TYPE: ClassVar[int] = 7
    session_id: bytes = wire(0, SESSION_ID)


@dataclass(frozen=True, eq=False)
class SessionClosed(Message):
    """The session is closed (spec/messages.md §5.8)."""

    TYPE: ClassVar[int] = 8
    session_id: bytes = wire(0, SESSION_ID)


@dataclass(frozen=True, eq=False)
class SetUpstream(Message):
    """The owner names its session's new upstream, after a failover (spec/messages.md §5.10)."""

    TYPE: ClassVar[int] = 16
    session_id: bytes = wire(0, SESSION_ID)
    upstream: PeerId | None = wire(1, UPSTREAM, optional=True)


@dataclass(frozen=True, eq=False)
class KeepAlive(Message):
    """The owner keeps its session from closing as idle while a step of its chain is under way
    (spec/messages.md §5.9, revision 5). No reply."""

    TYPE: ClassVar[int] = 17
    session_id: bytes = wire(0, SESSION_ID)


@dataclass(frozen=True, eq=False)
class PushAck(Message):
    """A ``Push`` was accepted and queued (spec/messages.md §5.7)."""

    TYPE: ClassVar[int] = 10
    session_id: bytes = wire(0, SESSION_ID)
    step_id: int = wire(1, STEP_ID)


@dataclass(frozen=True, eq=False)
class Forward(Message):
    """Stateless forward over blocks ``[start, end)`` (spec/messages.md §6.1)."""

    TYPE: ClassVar[int] = 11
    model: str = wire(0, MODEL)
    start: int = wire(1, BLOCK_START)
    end: int = wire(2, BLOCK_END)
    hidden: torch.Tensor = wire(4, ACTIVATIONS)
    codec: Codec = wire(3, CODEC, optional=False)
    prompts: torch.Tensor | None = wire(5, PROMPTS, optional=True)
    mask: torch.Tensor | None = wire(6, MASK, optional=True)
    adapter: str | None = wire(7, ADAPTER, optional=True)

    def _check_rules(self) -> None:
        _span_rule(self.start, self.end)
        _prompts_rule(self.prompts, self.hidden, self.end - self.start)
        _mask_rule(self, self.hidden)


@dataclass(frozen=True, eq=False)
class ForwardResult(Message):
    """The outputs of a ``Forward`` (spec/messages.md §6.1)."""

    TYPE: ClassVar[int] = 12
    hidden: torch.Tensor = wire(0, ACTIVATIONS)


@dataclass(frozen=True, eq=False)
class Backward(Message):
    """Stateless backward over blocks ``[start, end)`` (spec/messages.md §6.2)."""

    TYPE: ClassVar[int] = 13
    model: str = wire(0, MODEL)
    start: int = wire(1, BLOCK_START)
    end: int = wire(2, BLOCK_END)
    hidden: torch.Tensor = wire(4, ACTIVATIONS)
    grad_outputs: torch.Tensor = wire(5, ACTIVATIONS)
    codec: Codec = wire(3, CODEC)
    prompts: torch.Tensor | None = wire(6, PROMPTS, optional=True)
    mask: torch.Tensor | None = wire(7, MASK, optional=True)
    adapter: str | None = wire(8, ADAPTER, optional=True)

    def _check_rules(self) -> None:
        _span_rule(self.start, self.end)
        if self.grad_outputs.shape != self.hidden.shape:
            raise Violation(
                ErrorCode.INVALID_TENSOR,
                f"grad_outputs shape {list(self.grad_outputs.shape)} != hidden shape {list(self.hidden.shape)}",
            )
        _prompts_rule(self.prompts, self.hidden, self.end - self.start)
        _mask_rule(self, self.hidden)


@dataclass(frozen=True, eq=False)
class BackwardResult(Message):
    """Gradients of a ``Backward`` (spec/messages.md §6.2)."""

    TYPE: ClassVar[int] = 14
    grad_inputs: torch.Tensor = wire(0, ACTIVATIONS)
    grad_prompts: torch.Tensor | None = wire(1, PROMPTS, optional=True)

    def _check_rules(self) -> None:
        _prompts_rule(self.grad_prompts, self.grad_inputs, None)


@dataclass(frozen=True, eq=False)
class Error(Message):
    """The error reply (spec/messages.md §7.1). ``code`` is an ``ErrorCode``, or an int from a newer peer."""

    TYPE: ClassVar[int] = 15
    code: int = wire(0, ErrorCodeKind(1, 0xFFFF))
    message: str = wire(1, Text(0, MAX_ERROR_MESSAGE_BYTES))
    step_id: int | None = wire(2, STEP_ID, optional=True)

    def to_exception(self) -> RemoteProtocolError:
        """The error as the exception a client raises to its caller."""
        return RemoteProtocolError(self.code, self.message)


#: Envelope type code -> message class (spec/messages.md §3).
MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls
    for cls in (
        NodeInfoRequest,
        NodeInfo,
        OpenSession,
        SessionOpened,
        Step,
        StepResult,
        CloseSession,
        SessionClosed,
        Push,
        PushAck,
        Forward,
        ForwardResult,
        Backward,
        BackwardResult,
        Error,
        SetUpstream,
        KeepAlive,
    )
}

#: What may open a stream (spec/messages.md §2.1): the node decodes a stream's first frame
#: with ``decode_message(data, FIRST_MESSAGES)``.
FIRST_MESSAGES: Final = (NodeInfoRequest, OpenSession, Push, Forward, Backward)
#: What a client may send on an open session stream (§2.1).
SESSION_MESSAGES: Final = (Step, CloseSession, SetUpstream, KeepAlive)
#: Request type -> its reply type; any request may instead be answered by ``Error`` (§3).
REPLY_TO: Final[dict[type[Message], type[Message]]] = {
    NodeInfoRequest: NodeInfo,
    OpenSession: SessionOpened,
    Step: StepResult,
    CloseSession: SessionClosed,
    Push: PushAck,
    Forward: ForwardResult,
    Backward: BackwardResult,
}


# ----------------------------------------------------------------------------- codec


def encode_message(message: Message, codec: Codec | str | None = None) -> bytes:
    """The canonical bytes of ``message`` (spec/messages.md §2.3), one frame payload.

    Every tensor is encoded with ``codec``; with ``None``, losslessly for its dtype
    (f32 for float32/float64, bf16, f16). A node passes the codec its client asked for.
    """
    if not isinstance(message, Message) or type(message) not in MESSAGE_TYPES.values():
        raise LocalProtocolError(ErrorCode.UNKNOWN_MESSAGE, f"not a message: {type(message).__name__}")
    if codec is not None:
        try:
            codec = CODEC.check(codec)
        except Violation as exc:
            raise LocalProtocolError(exc.code, exc.message) from None
    return pack_envelope(message.TYPE, message._encode_body(codec))


def decode_message(data: bytes | bytearray | memoryview, expected: Iterable[type[Message]] | None = None) -> Message:
    """Decode one frame payload (spec/messages.md §2.5).

    ``expected``: the message classes acceptable here (§2.1); any other type is
    ``UNKNOWN_MESSAGE``. Raises only ``RemoteProtocolError`` on bad bytes.
    """
    return decode_from_table(data, MESSAGE_TYPES if expected is None else {cls.TYPE: cls for cls in expected})


def decode_from_table(data: bytes | bytearray | memoryview, known: dict[int, type[Message]],
                      version: int = PROTOCOL_VERSION) -> Message:
    """Decode one frame payload whose type must be one of ``known`` (type code -> class); shared
    with the protocols that reuse this envelope with their own ``version`` (spec/weights.md §3.1)."""
    type_code, body = unpack_envelope(data, known, version)
    try:
        return known[type_code]._decode_body(body)
    except Violation as exc:
        raise RemoteProtocolError(exc.code, f"{known[type_code].__name__}.{exc.message}") from None


def error_from_exception(exc: ProtocolError, step_id: int | None = None) -> Error:
    """The ``Error`` reply for a protocol error, its text cut to ``MAX_ERROR_MESSAGE_BYTES`` (§7.1)."""
    text = exc.message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE_BYTES].decode("utf-8", "ignore")
    code = exc.code if 1 <= int(exc.code) <= 0xFFFF else ErrorCode.INTERNAL
    return Error(code=code, message=text, step_id=step_id)

