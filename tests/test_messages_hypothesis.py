"""Hypothesis round trips for every node protocol message (spec/messages.md).

For any valid message: decode(encode(m)) == m, and the encoding is canonical (a fixed
point of decode-then-encode). Tensors use every dtype with every codec that is lossless
for it; strings are arbitrary Unicode within the byte limits.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from biopetals.protocol.errors import ErrorCode
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.limits import (
    MAX_BLOCKS,
    MAX_ERROR_MESSAGE_BYTES,
    MAX_LABEL_BYTES,
    MAX_SEQUENCE_LENGTH,
    MAX_SESSION_ID_BYTES,
)
from biopetals.protocol.messages import (
    MESSAGE_TYPES,
    Backward,
    BackwardResult,
    CloseSession,
    Error,
    Forward,
    ForwardResult,
    Hop,
    Message,
    NodeInfo,
    NodeInfoRequest,
    OpenSession,
    Push,
    PushAck,
    SessionClosed,
    SessionOpened,
    SetUpstream,
    KeepAlive,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from biopetals.protocol.tensors import Codec

U64 = st.integers(0, (1 << 64) - 1)
SESSION_IDS = st.binary(min_size=1, max_size=MAX_SESSION_ID_BYTES)
TEXT = st.characters(exclude_categories=("Cs",))  # any code point UTF-8 can carry


def text(min_bytes: int, max_bytes: int) -> st.SearchStrategy[str]:
    return st.text(TEXT, min_size=min_bytes, max_size=max_bytes).filter(
        lambda s: min_bytes <= len(s.encode()) <= max_bytes
    )


RATES = st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
CODECS = st.sampled_from(list(Codec))
# dtype -> codecs that carry it losslessly (None: encode_message picks by dtype).
LOSSLESS = {
    torch.float32: [None, Codec.F32],
    torch.bfloat16: [None, Codec.BF16],
    torch.float16: [None, Codec.F16, Codec.F16_ZSTD],
}


@st.composite
def spans(draw) -> tuple[int, int]:
    start = draw(st.integers(0, MAX_BLOCKS - 1))
    return start, draw(st.integers(start + 1, MAX_BLOCKS))


@st.composite
def tensors(draw, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    count = 1
    for size in shape:
        count *= size
    width = 16 if dtype == torch.float16 else 32
    values = draw(st.lists(st.floats(width=width, allow_nan=False, allow_infinity=False), min_size=count, max_size=count))
    tensor = torch.tensor(values, dtype=torch.float32).to(dtype).reshape(shape)
    if not bool(torch.isfinite(tensor).all()):  # f32 values beyond bf16's range round to inf
        tensor = torch.nan_to_num(tensor, posinf=1.0, neginf=-1.0)
    return tensor


@st.composite
def activations(draw, dtype: torch.dtype, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    if shape is None:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 8)))
    return draw(tensors(shape, dtype))


@st.composite
def prompts_for(draw, hidden: torch.Tensor, dtype: torch.dtype, blocks: int | None = None) -> torch.Tensor | None:
    if not draw(st.booleans()):
        return None
    batch, tokens, size = hidden.shape
    blocks = blocks if blocks is not None else draw(st.integers(1, 4))
    return draw(tensors((blocks, batch, draw(st.integers(1, tokens)), size), dtype))


@st.composite
def masks_for(draw, hidden: torch.Tensor) -> torch.Tensor | None:
    """A padding mask for ``hidden`` (spec/messages.md §8.1), or none."""
    if not draw(st.booleans()):
        return None
    batch, tokens = hidden.shape[:2]
    bits = draw(st.lists(st.booleans(), min_size=batch * tokens, max_size=batch * tokens))
    return torch.tensor(bits, dtype=torch.bool).reshape(batch, tokens)


PEERS = [Identity.from_private_bytes(bytes([seed]) * 32).peer_id for seed in range(1, 5)]


@st.composite
def multiaddrs(draw, peer: PeerId) -> str:
    host = ".".join(str(draw(st.integers(0, 255))) for _ in range(4))
    suffix = draw(st.sampled_from(["", f"/p2p/{peer}"]))
    return f"/ip4/{host}/tcp/{draw(st.integers(0, 65535))}{suffix}"


@st.composite
def hop_chains(draw) -> tuple[Hop, ...]:
    count = draw(st.integers(0, 4))
    start = draw(st.integers(0, MAX_BLOCKS - 4 * count))
    hops = []
    for _ in range(count):
        end = draw(st.integers(start + 1, start + 4))  # short spans keep prompts small
        peer = draw(st.sampled_from(PEERS))
        addrs = draw(st.lists(multiaddrs(peer), max_size=3))
        hops.append(Hop(peer_id=peer, addrs=addrs, session_id=draw(SESSION_IDS), start=start, end=end))
        start = end
    return tuple(hops)


@st.composite
def step_bodies(draw, cls: type[Message], dtype: torch.dtype) -> Message:
    hidden = draw(activations(dtype))
    position = draw(st.integers(0, MAX_SEQUENCE_LENGTH - hidden.shape[1]))
    hops = draw(hop_chains())
    covered = hops[-1].end - hops[0].start if hops else 0
    prompts = draw(prompts_for(hidden, dtype, blocks=covered + draw(st.integers(1, 3))))
    return cls(session_id=draw(SESSION_IDS), step_id=draw(U64), position=position, hidden=hidden, prompts=prompts,
               next=hops, mask=draw(masks_for(hidden)))


@st.composite
def messages(draw, cls: type[Message], dtype: torch.dtype) -> Message:
    """One valid message of type ``cls`` with tensors of ``dtype``."""
    if cls is NodeInfoRequest:
        return cls()
    if cls is NodeInfo:
        start, end = draw(spans())
        return cls(
            version=draw(text(1, MAX_LABEL_BYTES)), model=draw(text(1, 256)), start=start, end=end,
            dtype=draw(text(1, 16)), quant=draw(text(1, 16)), hidden_size=draw(st.integers(1, 65536)),
            cache_tokens_left=draw(U64), inference_tps=draw(RATES), forward_tps=draw(RATES),
        )
    if cls is OpenSession:
        start, end = draw(spans())
        return cls(
            model=draw(text(1, 256)), start=start, end=end, max_length=draw(st.integers(1, MAX_SEQUENCE_LENGTH)),
            batch_size=draw(st.integers(1, 64)), codec=draw(CODECS), session_id=draw(st.none() | SESSION_IDS),
            upstream=draw(st.none() | st.sampled_from(PEERS)),
        )
    if cls is SessionOpened:
        return cls(session_id=draw(SESSION_IDS), idle_timeout=draw(RATES.filter(lambda x: x > 0)),
                   upstream=draw(st.none() | st.sampled_from(PEERS)), rollback=draw(st.none() | st.just(1)),
                   keepalive=draw(st.none() | st.just(1)))
    if cls is SetUpstream:
        return cls(session_id=draw(SESSION_IDS), upstream=draw(st.none() | st.sampled_from(PEERS)))
    if cls in (Step, Push):
        return draw(step_bodies(cls, dtype))
    if cls is StepResult:
        return cls(session_id=draw(SESSION_IDS), step_id=draw(U64), hidden=draw(activations(dtype)))
    if cls in (CloseSession, SessionClosed, KeepAlive):
        return cls(session_id=draw(SESSION_IDS))
    if cls is PushAck:
        return cls(session_id=draw(SESSION_IDS), step_id=draw(U64))
    if cls in (Forward, Backward):
        start = draw(st.integers(0, MAX_BLOCKS - 1))
        end = draw(st.integers(start + 1, min(start + 4, MAX_BLOCKS)))
        hidden = draw(activations(dtype))
        extra = {"grad_outputs": draw(activations(dtype, tuple(hidden.shape)))} if cls is Backward else {}
        return cls(
            model=draw(text(1, 256)), start=start, end=end, codec=draw(CODECS), hidden=hidden,
            prompts=draw(prompts_for(hidden, dtype, blocks=end - start)), mask=draw(masks_for(hidden)), **extra,
        )
    if cls is ForwardResult:
        return cls(hidden=draw(activations(dtype)))
    if cls is BackwardResult:
        grad_inputs = draw(activations(dtype))
        return cls(grad_inputs=grad_inputs, grad_prompts=draw(prompts_for(grad_inputs, dtype)))
    if cls is Error:
        code = draw(st.sampled_from(list(ErrorCode)) | st.integers(1, 0xFFFF))
        return cls(code=code, message=draw(text(0, MAX_ERROR_MESSAGE_BYTES)), step_id=draw(st.none() | U64))
    raise AssertionError(cls)


@pytest.mark.parametrize("cls", list(MESSAGE_TYPES.values()), ids=lambda c: c.__name__)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    dtype = data.draw(st.sampled_from(list(LOSSLESS)))
    message = data.draw(messages(cls, dtype))
    codec = data.draw(st.sampled_from(LOSSLESS[dtype]))
    encoded = encode_message(message, codec)
    decoded = decode_message(encoded)
    assert decoded == message
    assert encode_message(decoded, codec) == encoded  # canonical: a fixed point
