"""Tests of stream message framing (spec/tensors.md §6): encode_frame and FrameDecoder."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.framing import FrameDecoder, encode_frame
from biopetals.protocol.limits import MAX_FRAME_BYTES


def drain(decoder: FrameDecoder) -> list[bytes]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_encode_frame_layout():
    assert encode_frame(b"\x81\x00\x01") == bytes.fromhex("00000003810001")  # spec/tensors.md §6.1 example
    assert encode_frame(bytes(300))[:4] == b"\x00\x00\x01\x2c"


def test_encode_frame_refuses_empty_and_oversize_payloads():
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(b"")
    assert info.value.code == ErrorCode.MALFORMED
    with pytest.raises(LocalProtocolError) as info:
        encode_frame(bytes(17), max_frame_bytes=16)
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    assert len(encode_frame(bytes(16), max_frame_bytes=16)) == 20


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_any_chunking_yields_the_same_frames(payloads, cuts):
    stream = b"".join(encode_frame(p) for p in payloads)
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    decoder = FrameDecoder()
    got = []
    for start, end in zip(bounds, bounds[1:]):
        decoder.receive_data(stream[start:end])
        got += drain(decoder)
    decoder.receive_data(b"")
    got += drain(decoder)
    assert got == payloads
    assert decoder.at_boundary
    assert decoder.statistics().frames_decoded == len(payloads)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=6))
def test_byte_by_byte_equals_whole(payloads):
    stream = b"".join(encode_frame(p) for p in payloads)
    whole = FrameDecoder()
    whole.receive_data(stream)
    one = FrameDecoder()
    got = []
    for i in range(len(stream)):
        one.receive_data(stream[i : i + 1])
        got += drain(one)
    assert drain(whole) == got == payloads


def test_frame_is_returned_only_when_complete():
    decoder = FrameDecoder()
    frame = encode_frame(b"hello")
    for i in range(len(frame) - 1):
        decoder.receive_data(frame[i : i + 1])
        assert decoder.next_frame() is None
    assert not decoder.at_boundary
    decoder.receive_data(frame[-1:])
    assert decoder.next_frame() == b"hello"
    assert decoder.at_boundary


def test_oversize_length_fails_on_the_fourth_prefix_byte():
    decoder = FrameDecoder(max_frame_bytes=16)
    prefix = (17).to_bytes(4, "big")
    for byte in prefix[:3]:
        decoder.receive_data(bytes([byte]))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.receive_data(prefix[3:])  # no payload byte sent yet
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_oversize_length_after_a_good_frame_fails_on_the_next_call():
    decoder = FrameDecoder(max_frame_bytes=16)
    decoder.receive_data(encode_frame(b"ok") + (1 << 31).to_bytes(4, "big"))
    assert decoder.next_frame() == b"ok"  # the good frame is delivered first
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED


def test_large_declared_frame_is_not_preallocated():
    """spec/tensors.md §6.3: a peer that declares 100 MiB and stalls costs nothing."""
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        decoder.receive_data((100 << 20).to_bytes(4, "big") + b"x" * 10)
        assert decoder.next_frame() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert decoder.statistics().pending_frame_bytes == 100 << 20
    assert decoder.statistics().buffered_bytes == 10


def test_max_frame_is_accepted():
    decoder = FrameDecoder(max_frame_bytes=1000)
    decoder.receive_data(encode_frame(bytes(1000), max_frame_bytes=1000))
    assert decoder.next_frame() == bytes(1000)


def test_zero_length_frame_is_malformed():
    decoder = FrameDecoder()
    with pytest.raises(RemoteProtocolError) as info:
        decoder.receive_data(b"\x00\x00\x00\x00")
    assert info.value.code == ErrorCode.MALFORMED


def test_decoder_stays_failed():
    decoder = FrameDecoder(max_frame_bytes=8)
    with pytest.raises(RemoteProtocolError):
        decoder.receive_data(b"\xff\xff\xff\xff")
    for call in (lambda: decoder.receive_data(encode_frame(b"a")), decoder.next_frame):
        with pytest.raises(RemoteProtocolError) as info:
            call()
        assert info.value.code == ErrorCode.LIMIT_EXCEEDED


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05ab"])
def test_end_of_stream_inside_a_frame_is_malformed(tail):
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"first") + tail)
    decoder.receive_data(b"")
    assert decoder.next_frame() == b"first"
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.MALFORMED


def test_end_of_stream_between_frames_is_clean():
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame(b"a"))
    decoder.receive_data(b"")
    assert drain(decoder) == [b"a"]
    assert decoder.next_frame() is None
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


def test_bad_limits_are_local_errors():
    for bad in (0, -1, MAX_FRAME_BYTES + 1):
        with pytest.raises(LocalProtocolError):
            FrameDecoder(max_frame_bytes=bad)


def test_nothing_is_held_between_frames_over_a_long_stream():
    decoder = FrameDecoder()
    frame = encode_frame(bytes(1000))
    for _ in range(2000):
        decoder.receive_data(frame)
        assert decoder.next_frame() == bytes(1000)
    assert decoder.statistics().buffered_bytes == 0
    assert decoder.at_boundary and not decoder._queue  # memory does not grow with the stream
