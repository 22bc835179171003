"""Sans-IO tests of ``FrameAssembler`` and ``whole_frame`` (spec/tensors.md §6.3), the framing
that transport/streams.py drives: the declared length before any body byte, admission, low-copy
assembly, and malformed or oversized prefixes fed byte by byte."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.framing import (
    AWAITING_ADMISSION,
    BODY,
    BOUNDARY,
    COMPLETE,
    FAILED,
    LENGTH_PREFIX_BYTES,
    PREFIX,
    FrameAssembler,
    encode_frame,
    frame_prefix,
    whole_frame,
)
from biopetals.protocol.limits import MAX_FRAME_BYTES


def feed(assembler: FrameAssembler, chunks: list[bytes], admit=lambda size: True) -> list[bytes]:
    """Drive an assembler the way a stream does: offer each chunk until it is taken, admitting lengths."""
    frames: list[bytes] = []
    pending = [memoryview(c) for c in chunks if c]
    while pending:
        if assembler.awaiting_admission:
            assert admit(assembler.declared_length)
            assembler.admit()
        taken = assembler.take(pending[0])
        pending[0] = pending[0][taken:]
        if not len(pending[0]):
            pending.pop(0)
        if assembler.complete:
            frames.append(assembler.pop_frame())
        elif taken == 0:
            assert assembler.awaiting_admission  # the only reason to take nothing of a non-empty chunk
    return frames


def test_frame_prefix_is_the_spec_layout():
    assert frame_prefix(3) == bytes.fromhex("00000003") == encode_frame(b"\x81\x00\x01")[:LENGTH_PREFIX_BYTES]


def test_declared_length_comes_with_the_fourth_prefix_byte_and_no_body_is_taken_before_admission():
    assembler = FrameAssembler()
    frame = encode_frame(b"hello")
    for i in range(3):
        assert assembler.take(frame[i : i + 1]) == 1
        assert assembler.declared_length is None and not assembler.at_boundary
    assert assembler.take(frame[3:]) == 1  # the prefix's last byte only: the body waits
    assert assembler.declared_length == 5 and assembler.awaiting_admission
    assert assembler.take(frame[4:]) == 0
    assert assembler.body_received == 0
    assembler.admit()
    assert assembler.take(frame[4:]) == 5
    assert assembler.complete and assembler.pop_frame() == b"hello"
    assert assembler.at_boundary and assembler.declared_length is None


def test_states_go_in_order_and_an_empty_chunk_changes_nothing():
    assembler = FrameAssembler()
    seen = []
    for chunk in (b"", b"\x00", b"", b"\x00\x00\x02", b"", b"a", b"", b"b"):
        assert assembler.take(chunk) == len(chunk)
        seen.append(assembler.state)
        if assembler.state == AWAITING_ADMISSION:
            assembler.admit()
            seen.append(assembler.state)
    assert seen == [BOUNDARY, PREFIX, PREFIX, AWAITING_ADMISSION, BODY, BODY, BODY, BODY, COMPLETE]
    assert assembler.pop_frame() == b"ab" and assembler.state == BOUNDARY
    with pytest.raises(RemoteProtocolError):
        assembler.take(bytes(4))
    assert assembler.state == FAILED
    assembler.discard()  # dropping the partial frame does not make a failed stream usable again
    assert assembler.state == FAILED


@pytest.mark.parametrize(
    ("limit", "length", "code"),
    [
        (MAX_FRAME_BYTES, 0, ErrorCode.MALFORMED),
        (MAX_FRAME_BYTES, MAX_FRAME_BYTES + 1, ErrorCode.LIMIT_EXCEEDED),
        (MAX_FRAME_BYTES, 0xFFFFFFFF, ErrorCode.LIMIT_EXCEEDED),
        (16, 17, ErrorCode.LIMIT_EXCEEDED),
        (16, 1 << 24, ErrorCode.LIMIT_EXCEEDED),
    ],
)
def test_bad_prefix_fed_byte_by_byte_fails_on_its_fourth_byte_and_stays_failed(limit, length, code):
    assembler = FrameAssembler(limit)
    prefix = length.to_bytes(4, "big")
    for byte in prefix[:3]:
        assert assembler.take(bytes([byte])) == 1
        assert assembler.declared_length is None
    with pytest.raises(RemoteProtocolError) as info:
        assembler.take(prefix[3:] + b"body")  # no body byte is taken, no length exposed
    assert info.value.code == code
    assert assembler.declared_length is None and assembler.buffered_bytes == 0
    for call in (lambda: assembler.take(encode_frame(b"ok")), assembler.end_of_stream, assembler.raise_if_failed):
        with pytest.raises(RemoteProtocolError) as again:
            call()
        assert again.value.code == code


def test_good_prefix_at_the_limit_is_accepted():
    assembler = FrameAssembler(16)
    assert feed(assembler, [encode_frame(bytes(16), max_frame_bytes=16)]) == [bytes(16)]


def test_take_stops_at_the_end_of_a_frame_until_it_is_popped():
    assembler = FrameAssembler(auto_admit=True)
    stream = encode_frame(b"one") + encode_frame(b"two")
    assert assembler.take(stream) == 7
    assert assembler.complete and assembler.take(stream[7:]) == 0
    assert assembler.pop_frame() == b"one"
    assert assembler.take(stream[7:]) == 7 and assembler.pop_frame() == b"two"


def test_a_body_that_arrives_as_one_bytes_chunk_is_returned_without_a_copy():
    assembler = FrameAssembler(auto_admit=True)
    body = bytes(range(200)) * 50
    assembler.take(frame_prefix(len(body)))
    assert assembler.take(body) == len(body)
    assert assembler.pop_frame() is body


def test_a_body_in_pieces_is_kept_as_views_and_joined_once():
    assembler = FrameAssembler(auto_admit=True)
    body = bytes(range(256)) * 4
    chunks = [frame_prefix(len(body)) + body[:100], body[100:700], body[700:] + b"\x00\x00"]
    assert assembler.take(chunks[0]) == 104
    assert assembler.take(chunks[1]) == 600
    assert all(type(piece) in (bytes, memoryview) for piece in assembler._pieces)
    assert assembler.take(chunks[2]) == len(chunks[2]) - 2  # the next frame's bytes stay with the caller
    assert assembler.pop_frame() == body


def test_a_large_declared_frame_is_not_preallocated():
    """spec/tensors.md §6.3: a peer that declares 100 MiB and stalls costs nothing."""
    assembler = FrameAssembler(auto_admit=True)
    tracemalloc.start()
    try:
        assembler.take(frame_prefix(100 << 20) + b"x" * 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert (assembler.declared_length, assembler.body_received, assembler.buffered_bytes) == (100 << 20, 10, 10)


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05", b"\x00\x00\x00\x05ab"])
def test_end_of_stream_inside_a_frame_is_malformed(tail):
    assembler = FrameAssembler(auto_admit=True)
    assert feed(assembler, [encode_frame(b"first"), tail]) == [b"first"]
    with pytest.raises(RemoteProtocolError) as info:
        assembler.end_of_stream()
    assert info.value.code == ErrorCode.MALFORMED


def test_end_of_stream_at_a_boundary_is_clean():
    assembler = FrameAssembler()
    assert feed(assembler, [encode_frame(b"a")]) == [b"a"]
    assembler.end_of_stream()


def test_misuse_is_a_local_error():
    assembler = FrameAssembler()
    with pytest.raises(LocalProtocolError):
        assembler.admit()  # no prefix yet
    with pytest.raises(LocalProtocolError):
        assembler.pop_frame()
    for bad in (0, -1, MAX_FRAME_BYTES + 1):
        with pytest.raises(LocalProtocolError):
            FrameAssembler(bad)


def test_discard_drops_a_partial_frame():
    assembler = FrameAssembler(auto_admit=True)
    assembler.take(frame_prefix(10) + b"abc")
    assembler.discard()
    assert assembler.at_boundary and assembler.buffered_bytes == 0
    assert feed(assembler, [encode_frame(b"next")]) == [b"next"]


def test_whole_frame_recognises_exactly_one_valid_frame():
    assert whole_frame(encode_frame(b"abc")) == b"abc"
    assert whole_frame(memoryview(encode_frame(b"abc"))) == b"abc"
    assert whole_frame(encode_frame(b"abc") + b"\x00") is None  # more than one frame's worth
    assert whole_frame(encode_frame(b"abc")[:-1]) is None  # a partial frame
    assert whole_frame(b"\x00\x00\x00\x00") is None  # zero length: left to the assembler to refuse
    assert whole_frame(encode_frame(bytes(17)), 16) is None  # over the limit: idem


@settings(max_examples=150, deadline=None)
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    sizes=st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=20),
)
def test_any_chunk_sizes_with_admission_yield_the_same_frames(payloads, sizes):
    stream = memoryview(b"".join(encode_frame(p) for p in payloads))
    chunks, at = [], 0
    while at < len(stream):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(stream[at : at + size])
        at += size
    admitted: list[int] = []
    assembler = FrameAssembler()
    assert feed(assembler, chunks, admit=lambda size: admitted.append(size) or True) == payloads
    assert admitted == [len(p) for p in payloads]  # each length is seen once, before its body
    assembler.end_of_stream()


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=40))
def test_any_input_is_framed_or_refused_with_a_remote_error_alike_whole_and_byte_by_byte(data):
    """h11's fuzz invariant over the assembler: the same outcome whole and byte by byte."""

    def outcome(chunks):
        assembler = FrameAssembler(8, auto_admit=True)
        try:
            frames = feed(assembler, chunks)
            assembler.end_of_stream()
            return frames, "ok"
        except RemoteProtocolError as exc:
            return None, ErrorCode(exc.code).name

    assert outcome([data]) == outcome([data[i : i + 1] for i in range(len(data))])
