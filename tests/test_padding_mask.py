"""The padding mask of spec/messages.md §8.1 and the session positions of §5.6: unit tests, no sockets.

The wire rules are pinned by the vectors (spec/vectors/messages.json, "… mask …");
here: what a vector cannot hold (a 512 KiB mask), the constructor's normalisation,
and the node's position rule against transformers' own ``generate()`` code.
"""

from __future__ import annotations

import msgpack
import pytest
import torch
from transformers import GenerationMixin

from biopetals.protocol.envelope import PROTOCOL_VERSION
from biopetals.models.step import positions_from_mask, span_step
from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_BATCH, MAX_SEQUENCE_LENGTH
from biopetals.protocol.messages import Forward, Step, decode_message, encode_message

pytestmark = pytest.mark.exactness

HIDDEN = torch.zeros(2, 3, 4)


def step(**changes) -> Step:
    return Step(session_id=b"s", step_id=1, position=0, hidden=HIDDEN, **changes)


def test_mask_over_the_limit_is_refused_before_its_length_is_compared():
    forward = Forward(model="m", start=0, end=1, codec="f32", hidden=torch.zeros(1, 1, 1))
    body = msgpack.unpackb(encode_message(forward), strict_map_key=False)[2]
    body[6] = b"\x01" * (MAX_BATCH * MAX_SEQUENCE_LENGTH + 1)
    data = msgpack.packb({0: PROTOCOL_VERSION, 1: Forward.TYPE, 2: body})
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_all_ones_mask_is_the_absent_mask_and_is_omitted():
    ones = step(mask=torch.ones(2, 3, dtype=torch.long))
    assert ones.mask is None
    assert encode_message(ones) == encode_message(step())


def test_mask_round_trip_keeps_its_shape_and_values():
    mask = torch.tensor([[0, 0, 1], [0, 1, 1]])
    decoded = decode_message(encode_message(step(mask=mask)))
    assert decoded.mask.dtype == torch.bool and torch.equal(decoded.mask, mask.bool())
    assert encode_message(step(mask=mask)).endswith(bytes([6, 0xC4, 6, 0, 0, 1, 0, 1, 1]))  # key 6, bin 8 of 6 bytes


@pytest.mark.parametrize(
    "mask, code",
    [
        (torch.tensor([[0, 1], [1, 1]]), ErrorCode.INVALID_TENSOR),  # [2, 2] for hidden [2, 3, 4]
        (torch.tensor([[0, 1, 2], [1, 1, 1]]), ErrorCode.INVALID_FIELD),  # 2 is not 0 or 1
        (torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]), ErrorCode.INVALID_FIELD),  # float
        (torch.tensor([0, 1, 1, 1, 1, 1]), ErrorCode.INVALID_TENSOR),  # rank 1
        ([[0, 1, 1], [1, 1, 1]], ErrorCode.INVALID_FIELD),  # not a tensor
    ],
)
def test_constructing_a_bad_mask_is_a_local_error(mask, code):
    with pytest.raises(LocalProtocolError) as info:
        step(mask=mask)
    assert info.value.code == code


class _Generator(GenerationMixin):
    """Just enough of a model for transformers' own position rule."""


@pytest.mark.parametrize("pad", [[0, 0, 0], [3, 1, 0], [5, 0, 2]])
def test_session_positions_equal_transformers_generate(pad):
    """Prefill of a left-padded batch, then decode steps: the node's positions (§5.6, one
    ``positions_from_mask`` through ``span_step``) are those ``generate()`` computes and extends."""
    length = 7
    mask = torch.tensor([[0] * p + [1] * (length - p) for p in pad])
    ref = _Generator()._prepare_position_ids_for_generation(
        torch.zeros(len(pad), length, dtype=torch.long), {"attention_mask": mask}
    )
    first = span_step(torch.zeros(len(pad), length, 4), 0, None, mask.bool())
    assert torch.equal(first.positions, ref)
    past = first.mask
    for _ in range(3):  # generate() extends positions by last + 1 each step
        ref = torch.cat([ref, ref[:, -1:] + 1], dim=1)
        step = span_step(torch.zeros(len(pad), 1, 4), past.shape[1], past, None)
        assert torch.equal(step.positions, ref[:, -1:]) and step.batchable
        past = step.mask


def test_session_positions_without_padding_are_columns():
    step = span_step(torch.zeros(2, 3, 4), 5)
    assert step.mask is None and step.positions.tolist() == [[5, 6, 7]]
    assert positions_from_mask(torch.tensor([[0, 1, 1, 0, 1]]), 2, 3).tolist() == [[1, 0, 2]]
