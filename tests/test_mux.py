"""Sans-IO tests of the stream multiplexer (protocol/mux.py, spec/transport.md §3.2-§3.9)."""

from __future__ import annotations

import os
import random

import pytest

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.mux import (
    HEADER_SIZE,
    INITIAL_WINDOW,
    MAX_CONCURRENT_STREAMS,
    MAX_DATA_PAYLOAD,
    MAX_WINDOW,
    DataReceived,
    Flag,
    Frame,
    FrameType,
    GoAwayReceived,
    Mux,
    PingReceived,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
    decode_frames,
    encode_frame,
)


def pair(**kwargs: object) -> tuple[Mux, Mux]:
    return Mux(initiator=True, **kwargs), Mux(initiator=False, **kwargs)  # type: ignore[arg-type]


def transfer(src: Mux, dst: Mux, *, chunk: int | None = None) -> list[object]:
    data = src.data_to_send()
    if chunk is None:
        return dst.receive_data(data)
    events: list[object] = []
    for i in range(0, len(data), chunk):
        events += dst.receive_data(data[i : i + chunk])
    return events


def payload_of(events: list[object], sid: int) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def frame(kind: FrameType, sid: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return encode_frame(Frame(kind, Flag(flags), sid, payload))


def expect_error(mux: Mux, data: bytes, code: ErrorCode) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        mux.receive_data(data)
    assert info.value.code == code, info.value
    return info.value


# --------------------------------------------------------------------------- streams


def test_open_data_half_close_both_ways() -> None:
    a, b = pair()
    sid = a.open_stream("/echo/1")
    assert sid == 1 and a.open_stream("/echo/1") == 3  # initiator: odd ids
    a.send_data(sid, b"hello", end_stream=True)
    events = transfer(a, b)
    assert events[0] == StreamOpened(1, "/echo/1")
    assert payload_of(events, 1) == b"hello"
    assert StreamEnded(1) in events and StreamOpened(3, "/echo/1") in events
    b.consumed(1, 5)
    b.send_data(1, b"world", end_stream=True)
    events = transfer(b, a)
    assert payload_of(events, 1) == b"world" and events[-1] == StreamEnded(1)
    assert not a.is_open(1) and not b.is_open(1)  # both FINs: forgotten
    assert b.open_stream("/x/1") == 2  # responder: even ids


@pytest.mark.parametrize("chunk", [1, 7, HEADER_SIZE, 65519, None])
def test_any_split_of_the_input_gives_the_same_stream(chunk: int | None) -> None:
    a, b = pair()
    sid = a.open_stream("/bulk/1")
    data = os.urandom(INITIAL_WINDOW)
    a.send_data(sid, data[:1000])
    a.send_ping(1.0)
    a.send_data(sid, data[1000:], end_stream=True)
    events = transfer(a, b, chunk=chunk)
    assert payload_of(events, sid) == data
    assert StreamEnded(sid) in events and PingReceived((1).to_bytes(8, "big")) in events


def test_large_writes_are_split_into_max_size_frames() -> None:
    a, _ = pair()
    sid = a.open_stream("/bulk/1")
    a.data_to_send()
    a.send_data(sid, bytes(MAX_DATA_PAYLOAD * 2 + 1))
    frames = decode_frames(a.data_to_send())
    assert [len(f.payload) for f in frames] == [MAX_DATA_PAYLOAD, MAX_DATA_PAYLOAD, 1]


def test_reset_forgets_the_stream_and_drops_its_in_flight_data() -> None:
    a, b = pair()
    sid = a.open_stream("/x/1")
    transfer(a, b)
    a.send_data(sid, b"in flight")
    in_flight = a.data_to_send()
    b.reset_stream(sid, ErrorCode.BUSY, "try later")
    assert transfer(b, a) == [StreamReset(sid, ErrorCode.BUSY, "try later")]
    assert not a.is_open(sid) and not b.is_open(sid)
    assert b.receive_data(in_flight) == []  # stream existed: late data is ignored, not an error


def test_too_many_streams_are_reset_not_fatal() -> None:
    a, b = Mux(initiator=True, max_streams=1000), Mux(initiator=False)
    for _ in range(MAX_CONCURRENT_STREAMS + 1):
        a.open_stream("/x/1")
    events = transfer(a, b)
    assert sum(isinstance(e, StreamOpened) for e in events) == MAX_CONCURRENT_STREAMS
    resets = transfer(b, a)
    assert resets == [StreamReset(2 * MAX_CONCURRENT_STREAMS + 1, ErrorCode.LIMIT_EXCEEDED, f"more than {MAX_CONCURRENT_STREAMS} concurrent streams")]


def test_local_misuse_is_a_local_error() -> None:
    a, _ = pair()
    with pytest.raises(LocalProtocolError):
        a.open_stream("no-slash")
    with pytest.raises(LocalProtocolError):
        a.open_stream("/with space")
    sid = a.open_stream("/x/1")
    with pytest.raises(LocalProtocolError) as info:
        a.send_data(sid, bytes(INITIAL_WINDOW + 1))
    assert info.value.code == ErrorCode.LIMIT_EXCEEDED
    a.end_stream(sid)
    with pytest.raises(LocalProtocolError):
        a.send_data(sid, b"x")


# --------------------------------------------------------------------------- flow control (§3.4)


def test_window_is_granted_back_only_when_the_application_consumes() -> None:
    a, b = pair()
    sid = a.open_stream("/bulk/1")
    a.send_data(sid, bytes(INITIAL_WINDOW))
    assert a.send_window(sid) == 0
    transfer(a, b)
    assert b.data_to_send() == b""  # received is not consumed: no credit back, no reset
    assert b.statistics().receive_buffered == INITIAL_WINDOW
    b.consumed(sid, INITIAL_WINDOW // 2 - 1)
    assert b.data_to_send() == b""  # below the update threshold (half the window)
    b.consumed(sid, 1)
    events = transfer(b, a)
    assert isinstance(events[0], WindowUpdated) and events[0].delta >= INITIAL_WINDOW // 2
    assert a.send_window(sid) == events[0].delta


def test_window_grows_while_the_reader_keeps_up_and_stops_at_max_window() -> None:
    a, b = pair(max_window=4 * INITIAL_WINDOW)
    sid = a.open_stream("/bulk/1")
    windows = []
    for _ in range(12):
        n = a.send_window(sid)
        windows.append(n)
        a.send_data(sid, bytes(n))
        transfer(a, b)
        b.consumed(sid, n)  # reader drains everything: it keeps up
        transfer(b, a)
    assert windows[0] == INITIAL_WINDOW
    assert max(windows) == 4 * INITIAL_WINDOW and windows[-1] == 4 * INITIAL_WINDOW


def test_receive_budget_caps_growth_over_all_streams() -> None:
    a, b = Mux(initiator=True), Mux(initiator=False, max_window=MAX_WINDOW, receive_budget=2 * INITIAL_WINDOW)
    sid = a.open_stream("/bulk/1")
    for _ in range(8):
        n = a.send_window(sid)
        a.send_data(sid, bytes(n))
        transfer(a, b)
        b.consumed(sid, n)
        transfer(b, a)
    assert a.send_window(sid) <= 2 * INITIAL_WINDOW


def test_data_beyond_the_window_is_a_flow_control_violation() -> None:
    a, b = pair()
    sid = a.open_stream("/bulk/1")
    a.send_data(sid, bytes(INITIAL_WINDOW))
    transfer(a, b)
    expect_error(b, frame(FrameType.DATA, sid, b"x"), ErrorCode.LIMIT_EXCEEDED)


def test_window_update_overflow_is_rejected() -> None:
    a, b = pair()
    sid = a.open_stream("/x/1")
    transfer(a, b)
    delta = MAX_WINDOW - INITIAL_WINDOW + 1
    expect_error(a, frame(FrameType.WINDOW_UPDATE, sid, delta.to_bytes(4, "big")), ErrorCode.LIMIT_EXCEEDED)


def test_no_credit_is_returned_after_fin() -> None:
    a, b = pair()
    sid = a.open_stream("/x/1")
    a.send_data(sid, bytes(INITIAL_WINDOW), end_stream=True)
    transfer(a, b)
    b.consumed(sid, INITIAL_WINDOW)
    assert b.data_to_send() == b""


# --------------------------------------------------------------------------- state errors (§3.7)


def test_data_on_a_never_opened_stream_is_fatal_and_sticky() -> None:
    _, b = pair()
    err = expect_error(b, frame(FrameType.DATA, 5, b"x"), ErrorCode.STREAM_STATE)
    with pytest.raises(RemoteProtocolError) as again:
        b.receive_data(b"")
    assert again.value.code == err.code


def test_data_after_fin_is_fatal() -> None:
    a, b = pair()
    sid = a.open_stream("/x/1")
    a.end_stream(sid)
    transfer(a, b)
    expect_error(b, frame(FrameType.DATA, sid, b"x"), ErrorCode.STREAM_STATE)


def test_open_with_wrong_parity_or_reused_id_is_fatal() -> None:
    _, b = pair()
    expect_error(b, frame(FrameType.OPEN, 2, b"/x/1"), ErrorCode.STREAM_STATE)
    _, b = pair()
    b.receive_data(frame(FrameType.OPEN, 3, b"/x/1"))
    expect_error(b, frame(FrameType.OPEN, 1, b"/x/1"), ErrorCode.STREAM_STATE)


def test_header_errors_are_detected_before_the_payload_arrives() -> None:
    _, b = pair()
    header = encode_frame(Frame(FrameType.DATA, Flag.NONE, 1, b""))[:8] + (MAX_DATA_PAYLOAD + 1).to_bytes(4, "big")
    expect_error(b, header, ErrorCode.LIMIT_EXCEEDED)
    _, b = pair()
    expect_error(b, bytes([2]) + bytes(11), ErrorCode.UNSUPPORTED_VERSION)
    _, b = pair()
    expect_error(b, bytes([1, 9]) + bytes(10), ErrorCode.MALFORMED)


# --------------------------------------------------------------------------- ping, go away (§3.9)


def test_ping_returns_the_callers_time() -> None:
    a, b = pair()
    opaque = a.send_ping(now=12.5)
    assert transfer(a, b) == [PingReceived(opaque)]
    assert transfer(b, a) == [PongReceived(opaque, 12.5)]
    assert a.receive_data(frame(FrameType.PING, 0, opaque, Flag.ACK)) == []  # duplicate pong: ignored


def test_go_away_refuses_new_streams_but_keeps_open_ones() -> None:
    a, b = pair()
    sid = a.open_stream("/x/1")
    transfer(a, b)
    b.go_away(0, "bye")
    assert transfer(b, a) == [GoAwayReceived(0, "bye")]
    with pytest.raises(LocalProtocolError):
        a.open_stream("/x/1")
    a.send_data(sid, b"still fine", end_stream=True)
    assert payload_of(transfer(a, b), sid) == b"still fine"


def test_open_crossing_our_go_away_is_refused_with_a_reset() -> None:
    a, b = pair()
    b.go_away()
    b.data_to_send()
    sid = a.open_stream("/x/1")
    assert transfer(a, b) == []
    assert transfer(b, a) == [StreamReset(sid, ErrorCode.CONNECTION_CLOSED, "connection is going away")]


# --------------------------------------------------------------------------- frames


def test_frames_round_trip_and_fuzzed_input_only_raises_remote_errors() -> None:
    frames = [
        Frame(FrameType.OPEN, Flag.NONE, 1, b"/biopetals/rpc/1"),
        Frame(FrameType.DATA, Flag.FIN, 1, b"abc"),
        Frame(FrameType.WINDOW_UPDATE, Flag.NONE, 1, (1000).to_bytes(4, "big")),
        Frame(FrameType.PING, Flag.ACK, 0, bytes(8)),
        Frame(FrameType.GO_AWAY, Flag.NONE, 0, bytes(4) + b"bye"),
        Frame(FrameType.RESET, Flag.NONE, 1, (68).to_bytes(4, "big")),
    ]
    wire = b"".join(encode_frame(f) for f in frames)
    assert decode_frames(wire) == frames
    rng = random.Random(3)
    for _ in range(3000):
        data = bytearray(wire)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        for mux in pair():
            try:
                mux.receive_data(bytes(data))
            except RemoteProtocolError:
                pass
        try:
            decode_frames(bytes(data))
        except RemoteProtocolError:
            pass
