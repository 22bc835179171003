"""Sans-IO stream multiplexer: many ordered, flow-controlled byte streams over one channel.

See spec/transport.md §3.2-§3.9. The multiplexer runs on the
plaintext side of the secure channel: ``receive_data`` takes decrypted bytes and
returns events; every call that produces output queues frames that
``data_to_send`` hands to the caller (who encrypts and writes them). Nothing here
does I/O or reads a clock: ``send_ping(now)`` takes the time and ``PongReceived``
gives it back, so the caller computes the round-trip time with its own clock.

Frame (§3.2), all integers big-endian::

    0       1       2               4                               8                              12
    +-------+-------+---------------+-------------------------------+-------------------------------+---------
    |version| type  |    flags      |          stream id            |            length             | payload
    +-------+-------+---------------+-------------------------------+-------------------------------+---------

Flow control (§3.4): each direction of each stream has a window of
``INITIAL_WINDOW`` bytes. A DATA payload uses up window; the receiver gives it
back with WINDOW_UPDATE only for bytes the *application* has consumed
(``consumed``), so a reader that stops reading - for a long GPU step, say - stops
the writer after at most one window, and the stream is never reset for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final, Protocol, Union

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "VERSION",
    "HEADER_SIZE",
    "INITIAL_WINDOW",
    "MAX_WINDOW",
    "MAX_DATA_PAYLOAD",
    "MAX_CONCURRENT_STREAMS",
    "MAX_PROTOCOL_NAME",
    "MAX_RESET_REASON",
    "PING_PAYLOAD_SIZE",
    "MAX_OUTSTANDING_PINGS",
    "RECEIVE_BUDGET",
    "FrameType",
    "Flag",
    "Frame",
    "encode_frame",
    "decode_frames",
    "validate_protocol_name",
    "Mux",
    "MuxStatistics",
    "StreamOpened",
    "DataReceived",
    "StreamEnded",
    "StreamReset",
    "WindowUpdated",
    "PingReceived",
    "PongReceived",
    "GoAwayReceived",
    "Event",
    "MuxEventSink",
]

# --------------------------------------------------------------------------- parameters (§3.1)

#: Frame format version carried in every header.
VERSION: Final = 1
#: version u8, type u8, flags u16, stream id u32, length u32.
_HEADER: Final = struct.Struct(">BBHII")
HEADER_SIZE: Final = _HEADER.size  # 12
#: Window each side starts with, per stream and direction, without any WINDOW_UPDATE.
INITIAL_WINDOW: Final = 256 * 1024
#: Largest send window a receiver may grant (sum of unused credit); more is a protocol error.
MAX_WINDOW: Final = 16 * 1024 * 1024
#: Largest DATA payload in one frame; bigger writes are split. Keeps streams interleaved fairly.
MAX_DATA_PAYLOAD: Final = 64 * 1024
#: Most streams the peer may have open towards us at once; more are reset, not fatal.
MAX_CONCURRENT_STREAMS: Final = 256
#: Longest protocol name in OPEN, in bytes.
MAX_PROTOCOL_NAME: Final = 128
#: Longest UTF-8 reason after the error code in RESET and GO_AWAY.
MAX_RESET_REASON: Final = 512
#: PING payload: an opaque value the reply echoes.
PING_PAYLOAD_SIZE: Final = 8
#: Pings we remember waiting for a reply; older ones are forgotten (their pong is ignored).
MAX_OUTSTANDING_PINGS: Final = 16
#: Default cap (implementation policy, §3.4) on bytes the peer may have in flight or
#: buffered towards us over all streams before windows stop growing past INITIAL_WINDOW.
RECEIVE_BUDGET: Final = 64 * 1024 * 1024

_MAX_U32: Final = 0xFFFFFFFF
# DATA chunks up to this size are copied out of the input; bigger ones are passed as views.
_SMALL_COPY: Final = 4096


class FrameType(IntEnum):
    """Frame types (§3.3)."""

    DATA = 0  # stream bytes; FIN flag half-closes
    WINDOW_UPDATE = 1  # payload u32: credit added to the receiver's window
    PING = 2  # stream 0; payload 8 opaque bytes; ACK flag marks the reply
    GO_AWAY = 3  # stream 0; payload u32 error code + UTF-8 reason; no new streams
    OPEN = 4  # opens a stream; payload = protocol name
    RESET = 5  # aborts a stream both ways; payload u32 error code + UTF-8 reason


class Flag(IntFlag):
    NONE = 0
    FIN = 0x1  # DATA only: the sender will send nothing more on this stream
    ACK = 0x2  # PING only: this is the reply


_ALLOWED_FLAGS: Final = {
    FrameType.DATA: Flag.FIN,
    FrameType.WINDOW_UPDATE: Flag.NONE,
    FrameType.PING: Flag.ACK,
    FrameType.GO_AWAY: Flag.NONE,
    FrameType.OPEN: Flag.NONE,
    FrameType.RESET: Flag.NONE,
}
# (min, max) payload length per type, checked from the header before buffering the payload.
_PAYLOAD_LIMITS: Final = {
    FrameType.DATA: (0, MAX_DATA_PAYLOAD),
    FrameType.WINDOW_UPDATE: (4, 4),
    FrameType.PING: (PING_PAYLOAD_SIZE, PING_PAYLOAD_SIZE),
    FrameType.GO_AWAY: (4, 4 + MAX_RESET_REASON),
    FrameType.OPEN: (1, MAX_PROTOCOL_NAME),
    FrameType.RESET: (4, 4 + MAX_RESET_REASON),
}
_SESSION_TYPES: Final = frozenset({FrameType.PING, FrameType.GO_AWAY})  # stream id 0
# type value -> (type, allowed flags, min payload, max payload, on stream 0): one lookup per header.
_RULES: Final = {
    int(t): (t, int(_ALLOWED_FLAGS[t]), *_PAYLOAD_LIMITS[t], t in _SESSION_TYPES) for t in FrameType
}
# Plain ints for the hot path (IntFlag arithmetic is slow).
_FIN: Final = int(Flag.FIN)
_ACK: Final = int(Flag.ACK)
_DATA: Final = int(FrameType.DATA)
_VISIBLE_ASCII: Final = bytes(range(0x21, 0x7F))
# Enum members as module constants: ``FrameType.X`` is an attribute lookup through the enum
# class (~70 ns) and packing an IntEnum calls ``__index__``; the hot path uses these instead.
_K_DATA: Final = FrameType.DATA
_K_WINDOW_UPDATE: Final = FrameType.WINDOW_UPDATE
_K_OPEN: Final = FrameType.OPEN
_K_RESET: Final = FrameType.RESET
_K_PING: Final = FrameType.PING
_T_WINDOW_UPDATE: Final = int(FrameType.WINDOW_UPDATE)
_T_OPEN: Final = int(FrameType.OPEN)
_T_RESET: Final = int(FrameType.RESET)
_T_PING: Final = int(FrameType.PING)
_T_GO_AWAY: Final = int(FrameType.GO_AWAY)


# --------------------------------------------------------------------------- frames (§3.2)


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame as on the wire. ``payload`` is type-specific (§3.3)."""

    type: FrameType
    flags: Flag
    stream_id: int
    payload: bytes


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.MALFORMED, message)


def _check_header(version: int, ftype: int, flags: int, stream_id: int, length: int) -> FrameType:
    """Validate a header before its payload is buffered (§3.3). Returns the type."""
    rule = _RULES.get(ftype) if version == VERSION else None
    if rule is not None:
        kind, allowed, low, high, session = rule
        if not flags & ~allowed and low <= length <= high and (stream_id == 0) is session:
            return kind
    _header_error(version, ftype, flags, stream_id, length)
    raise AssertionError("unreachable")


def _header_error(version: int, ftype: int, flags: int, stream_id: int, length: int) -> None:
    """Raise the precise error for a header that ``_check_header`` rejected."""
    if version != VERSION:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, f"mux frame version {version}, expected {VERSION}")
    if ftype not in _RULES:
        raise _malformed(f"unknown mux frame type {ftype}")
    kind, allowed, low, high, session = _RULES[ftype]
    if flags & ~allowed:
        raise _malformed(f"flags {flags:#06x} not allowed on {kind.name}")
    if length > high:
        code = ErrorCode.LIMIT_EXCEEDED if low != high else ErrorCode.MALFORMED
        raise RemoteProtocolError(code, f"{kind.name} payload of {length} bytes, limit {high}")
    if length < low:
        raise _malformed(f"{kind.name} payload of {length} bytes, at least {low} required")
    raise _malformed(f"{kind.name} on stream {stream_id}: " + ("must be stream 0" if session else "stream 0 is reserved"))


def validate_protocol_name(name: bytes) -> str:
    """Decode an OPEN payload (§3.5): 1-128 bytes of visible ASCII starting with '/'."""
    known = _NAME_CACHE.get(name) if type(name) is bytes else None
    if known is not None:
        return known
    if not 1 <= len(name) <= MAX_PROTOCOL_NAME:
        raise RemoteProtocolError(ErrorCode.INVALID_FIELD, f"protocol name of {len(name)} bytes, must be 1-{MAX_PROTOCOL_NAME}")
    if name[0] != 0x2F or bytes(name).translate(None, _VISIBLE_ASCII):
        raise RemoteProtocolError(
            ErrorCode.INVALID_FIELD, f"protocol name {bytes(name)!r} must be visible ASCII starting with '/'"
        )
    text = name.decode("ascii")
    if len(_NAME_CACHE) < 256:  # a few protocol names recur on every call
        _NAME_CACHE[bytes(name)] = text
    return text


_NAME_CACHE: dict[bytes, str] = {}
#: Protocol names ``Mux.open_stream`` already validated, with their encoding.
_OPEN_NAMES: dict[str, bytes] = {}


def _decode_code_reason(payload: bytes, kind: str) -> tuple[int, str]:
    code = int.from_bytes(payload[:4], "big")
    try:
        reason = bytes(payload[4:]).decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(f"{kind} reason is not UTF-8") from None
    return code, reason


def _encode_code_reason(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")[:MAX_RESET_REASON]
    # Cutting may split a multi-byte character; drop the partial tail.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return int(code).to_bytes(4, "big") + raw


def encode_frame(frame: Frame) -> bytes:
    """Serialize one frame. Raises LocalProtocolError for a frame the spec forbids."""
    try:
        _check_header(VERSION, frame.type, frame.flags, frame.stream_id, len(frame.payload))
    except RemoteProtocolError as exc:
        raise LocalProtocolError(exc.code, exc.message) from None
    if not 0 <= frame.stream_id <= _MAX_U32:
        raise LocalProtocolError(ErrorCode.INVALID_FIELD, "stream id out of range")
    return _HEADER.pack(VERSION, frame.type, frame.flags, frame.stream_id, len(frame.payload)) + bytes(frame.payload)


def decode_frames(data: bytes) -> list[Frame]:
    """Parse a complete byte string into frames, checking structure only (§3.2).

    Stream state (unknown ids, windows) is the ``Mux``'s job. Trailing partial
    frames are MALFORMED here, since the input is declared complete.
    """
    frames: list[Frame] = []
    view = memoryview(bytes(data))
    pos = 0
    while pos < len(view):
        if len(view) - pos < HEADER_SIZE:
            raise _malformed(f"{len(view) - pos} trailing bytes, less than a frame header")
        version, ftype, flags, sid, length = _HEADER.unpack_from(view, pos)
        kind = _check_header(version, ftype, flags, sid, length)
        end = pos + HEADER_SIZE + length
        if end > len(view):
            raise _malformed(f"{kind.name} frame declares {length} payload bytes, {len(view) - pos - HEADER_SIZE} present")
        payload = bytes(view[pos + HEADER_SIZE : end])
        _check_payload(kind, payload)
        frames.append(Frame(kind, Flag(flags), sid, payload))
        pos = end
    return frames


def _check_payload(kind: FrameType, payload: bytes) -> None:
    """Payload checks that need no stream state (§3.3)."""
    if kind is FrameType.OPEN:
        validate_protocol_name(payload)
    elif kind is FrameType.RESET or kind is FrameType.GO_AWAY:
        _decode_code_reason(payload, kind.name)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer opened ``stream_id`` for ``protocol`` (§3.5)."""

    stream_id: int
    protocol: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Stream bytes. Call ``Mux.consumed(stream_id, len(data))`` once the application has them."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed: no more data will arrive on ``stream_id``."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer aborted ``stream_id``; it is gone both ways."""

    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """We may now send ``delta`` more bytes on ``stream_id``."""

    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the reply is already queued."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Reply to our ping sent at ``sent_at`` (the ``now`` given to ``send_ping``)."""

    opaque: bytes
    sent_at: float


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    """The peer will open no more streams and refuses new ones; existing ones go on."""

    code: int
    reason: str


Event = Union[StreamOpened, DataReceived, StreamEnded, StreamReset, WindowUpdated, PingReceived, PongReceived, GoAwayReceived]


class MuxEventSink(Protocol):
    """Receives ``Mux.receive_data_into``'s events as calls, one method per event class above."""

    def stream_opened(self, stream_id: int, protocol: str) -> None: ...
    def data_received(self, stream_id: int, data: bytes | memoryview) -> None: ...
    def stream_ended(self, stream_id: int) -> None: ...
    # Two pairs of events fused into one call, for the unary hot path (§3.11):
    def data_ended(self, stream_id: int, data: bytes | memoryview) -> None:
        """DATA with FIN and a payload: ``data_received`` then ``stream_ended``."""
    def unary_opened(self, stream_id: int, protocol: str, data: bytes | memoryview) -> None:
        """OPEN directly followed by the stream's DATA with FIN: ``stream_opened`` then ``data_ended``."""
    def stream_reset(self, stream_id: int, code: int, reason: str) -> None: ...
    def window_updated(self, stream_id: int, delta: int) -> None: ...
    def ping_received(self, opaque: bytes) -> None: ...
    def pong_received(self, opaque: bytes, sent_at: float) -> None: ...
    def go_away_received(self, code: int, reason: str) -> None: ...


class _EventCollector:
    """The sink behind ``Mux.receive_data``: turns each call back into its event object."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def stream_opened(self, stream_id: int, protocol: str) -> None:
        self.events.append(StreamOpened(stream_id, protocol))

    def data_received(self, stream_id: int, data: bytes | memoryview) -> None:
        self.events.append(DataReceived(stream_id, data))  # type: ignore[arg-type]

    def stream_ended(self, stream_id: int) -> None:
        self.events.append(StreamEnded(stream_id))

    def data_ended(self, stream_id: int, data: bytes | memoryview) -> None:
        self.events += (DataReceived(stream_id, data), StreamEnded(stream_id))  # type: ignore[arg-type]

    def unary_opened(self, stream_id: int, protocol: str, data: bytes | memoryview) -> None:
        self.events += (StreamOpened(stream_id, protocol), DataReceived(stream_id, data), StreamEnded(stream_id))  # type: ignore[arg-type]

    def stream_reset(self, stream_id: int, code: int, reason: str) -> None:
        self.events.append(StreamReset(stream_id, code, reason))

    def window_updated(self, stream_id: int, delta: int) -> None:
        self.events.append(WindowUpdated(stream_id, delta))

    def ping_received(self, opaque: bytes) -> None:
        self.events.append(PingReceived(opaque))

    def pong_received(self, opaque: bytes, sent_at: float) -> None:
        self.events.append(PongReceived(opaque, sent_at))

    def go_away_received(self, code: int, reason: str) -> None:
        self.events.append(GoAwayReceived(code, reason))


@dataclass(frozen=True, slots=True)
class MuxStatistics:
    local_streams: int  # open streams we opened
    remote_streams: int  # open streams the peer opened
    receive_buffered: int  # bytes received but not yet consumed, all streams
    outstanding_pings: int
    going_away: bool  # either side sent GO_AWAY


# --------------------------------------------------------------------------- state machine


class _Stream:
    __slots__ = ("send_window", "recv_window", "recv_target", "unacked", "buffered", "local_closed", "remote_closed", "local")

    def __init__(self, local: bool) -> None:
        self.send_window = INITIAL_WINDOW  # bytes we may still send
        self.recv_window = INITIAL_WINDOW  # bytes the peer may still send
        self.recv_target = INITIAL_WINDOW  # window we keep granted while the reader keeps up
        self.unacked = 0  # consumed by the application, not yet granted back
        self.buffered = 0  # received, not yet consumed
        self.local_closed = False  # we sent FIN
        self.remote_closed = False  # peer sent FIN
        self.local = local  # we opened it


class Mux:
    """One side of a multiplexed connection (§3.2-§3.9).

    ``initiator`` is True on the side that dialled the TCP connection: it opens
    odd stream ids, the other side even ones (§3.5).

    ``max_window`` bounds how far a stream's receive window may grow when its
    reader keeps up (§3.4), ``receive_budget`` bounds the total over all streams.
    Defaults give a throughput of several hundred MB/s on one stream while a
    stalled reader holds at most ``max_window`` bytes.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        max_window: int = 4 * 1024 * 1024,
        receive_budget: int = RECEIVE_BUDGET,
        max_streams: int = MAX_CONCURRENT_STREAMS,
    ) -> None:
        if not INITIAL_WINDOW <= max_window <= MAX_WINDOW:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"max_window must be in [{INITIAL_WINDOW}, {MAX_WINDOW}]")
        self.initiator = initiator
        self._max_window = max_window
        self._receive_budget = receive_budget
        self._max_streams = max_streams
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if initiator else 2
        self._last_remote_id = 0  # highest stream id the peer opened
        self._remote_open = 0  # live streams the peer opened
        self._local_open = 0
        self._granted = 0  # sum over streams of recv_window + buffered: our receive exposure
        # receive parser state (§3.2): a partial header or control payload, or a DATA payload in flight
        self._partial = bytearray()
        self._header: tuple[FrameType, int, int, int] | None = None  # control frame awaiting its payload
        self._data_left = 0  # payload bytes of the current DATA frame still to come
        self._data_sid = 0
        self._data_fin = False
        self._data_stream: _Stream | None = None  # None: the frame's stream is gone, drop its bytes
        self._out: list[bytes | memoryview] = []
        self._pings: dict[bytes, float] = {}
        self._ping_counter = 0
        self._local_going_away = False
        self._remote_going_away = False
        self._error: RemoteProtocolError | None = None

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Return (and forget) every byte queued for the peer, b"" if none."""
        if not self._out:
            return b""
        out = self._out
        self._out = []
        return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)

    def has_data_to_send(self) -> bool:
        return bool(self._out)

    def _frame(self, kind: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self._out.append(_HEADER.pack(VERSION, kind, flags, sid, len(payload)) + payload)

    # ------------------------------------------------------------------ local actions

    def open_stream(self, protocol: str) -> int:
        """Open a stream for ``protocol`` and return its id. The OPEN frame is queued."""
        sid, name, _ = self._open(protocol)
        self._out.append(_HEADER.pack(VERSION, _T_OPEN, 0, sid, len(name)) + name)
        return sid

    def open_unary(self, protocol: str, prefix: bytes, message: bytes | bytearray | memoryview, size: int) -> int:
        """Open a stream and send its one message with FIN (the unary fast path, §3.11); returns its id.

        ``prefix + message`` is ``size`` bytes, at most ``MAX_DATA_PAYLOAD`` (a new stream's
        window, INITIAL_WINDOW, always allows it). Queues the same frames as ``open_stream``
        followed by ``send_last_message``, joined into one buffer.
        """
        if size > MAX_DATA_PAYLOAD:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{size} bytes do not fit one DATA frame ({MAX_DATA_PAYLOAD})")
        sid, name, st = self._open(protocol)
        st.send_window -= size
        st.local_closed = True
        self._out.append(
            b"".join((_HEADER.pack(VERSION, _T_OPEN, 0, sid, len(name)), name, _HEADER.pack(VERSION, _DATA, _FIN, sid, size), prefix, message))
        )
        return sid

    def _open(self, protocol: str) -> tuple[int, bytes, _Stream]:
        """Checks and state of a new local stream; the caller queues its OPEN frame."""
        name = _OPEN_NAMES.get(protocol) if type(protocol) is str else None
        if name is None:
            try:
                name = protocol.encode("ascii")
                validate_protocol_name(name)
            except (UnicodeEncodeError, AttributeError, RemoteProtocolError):
                raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"invalid protocol name {protocol!r} (§3.5)") from None
            if type(protocol) is str and len(_OPEN_NAMES) < 256:  # a few names recur on every call
                _OPEN_NAMES[protocol] = name
        if self._local_going_away or self._remote_going_away:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "connection is going away; open a new one")
        if self._local_open >= self._max_streams:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"already {self._local_open} streams open (limit {self._max_streams})")
        sid = self._next_local_id
        if sid > _MAX_U32:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, "stream ids exhausted; open a new connection")
        self._next_local_id += 2
        st = self._streams[sid] = _Stream(local=True)
        self._local_open += 1
        self._granted += INITIAL_WINDOW
        return sid, name, st

    def send_window(self, stream_id: int) -> int:
        """Bytes ``send_data`` accepts now on ``stream_id`` (0 for a closed or unknown stream)."""
        st = self._streams.get(stream_id)
        return 0 if st is None or st.local_closed else st.send_window

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_data(self, stream_id: int, data: bytes | memoryview, *, end_stream: bool = False) -> None:
        """Queue ``data`` (at most ``send_window(stream_id)`` bytes), then FIN if ``end_stream``.

        ``data`` is referenced, not copied, until the next ``data_to_send()``.
        """
        st = self._streams.get(stream_id)
        if st is None:
            raise LocalProtocolError(ErrorCode.STREAM_RESET, f"stream {stream_id} is not open")
        if st.local_closed:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, f"stream {stream_id} already half-closed by us")
        size = len(data)
        if size > st.send_window:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"{size} bytes > send window {st.send_window} of stream {stream_id}")
        st.send_window -= size
        out = self._out
        if size <= MAX_DATA_PAYLOAD:  # one frame (every small message): no splitting loop
            out.append(_HEADER.pack(VERSION, _DATA, _FIN if end_stream else 0, stream_id, size))
            if size:
                out.append(data)
            if end_stream:
                st.local_closed = True
                if st.remote_closed:
                    self._forget(stream_id, st)
            return
        pack = _HEADER.pack
        view = memoryview(data) if size > MAX_DATA_PAYLOAD else data
        pos = 0
        while True:
            chunk = view[pos : pos + MAX_DATA_PAYLOAD] if size > MAX_DATA_PAYLOAD else view
            pos += len(chunk)
            last = pos >= size
            flags = _FIN if (last and end_stream) else 0
            out.append(pack(VERSION, _DATA, flags, stream_id, len(chunk)))
            if len(chunk):
                out.append(chunk)
            if last:
                break
        if end_stream:
            st.local_closed = True
            self._maybe_forget(stream_id, st)

    def send_last_message(self, stream_id: int, prefix: bytes, message: bytes | bytearray | memoryview, size: int) -> int:
        """The unary fast path (§3.11): ``prefix + message`` (``size`` bytes in all, at most
        ``MAX_DATA_PAYLOAD``) in one DATA frame with FIN, if the stream is open for sending and
        its window allows. Returns 0 if not (nothing queued), 1 if queued, 2 if queued and the
        stream is now closed both ways (forgotten). Same frames as ``send_data(..., end_stream=True)``.
        """
        st = self._streams.get(stream_id)
        if st is None or st.local_closed or size > st.send_window:
            return 0
        st.send_window -= size
        self._out.append(b"".join((_HEADER.pack(VERSION, _DATA, _FIN, stream_id, size), prefix, message)))
        st.local_closed = True
        if st.remote_closed:
            self._forget(stream_id, st)
            return 2
        return 1

    def end_stream(self, stream_id: int) -> None:
        """Half-close: queue an empty DATA frame with FIN."""
        self.send_data(stream_id, b"", end_stream=True)

    def reset_stream(self, stream_id: int, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort ``stream_id`` both ways. No-op if it is already gone."""
        st = self._streams.get(stream_id)
        if st is None:
            return
        self._frame(_T_RESET, 0, stream_id, _encode_code_reason(code, reason))
        self._forget(stream_id, st)

    def consumed(self, stream_id: int, size: int) -> None:
        """The application took ``size`` bytes of ``stream_id``: grant them back (§3.4).

        A WINDOW_UPDATE is queued once half the stream's window has been consumed,
        so updates stay few. The window doubles (up to ``max_window`` and the
        connection's ``receive_budget``) when the reader has drained everything
        received, i.e. the reader keeps up and the window is what limits speed.
        """
        st = self._streams.get(stream_id)
        if st is None:
            return
        if not 0 <= size <= st.buffered:
            raise LocalProtocolError(ErrorCode.INVALID_FIELD, f"consumed {size} bytes but {st.buffered} are buffered")
        st.buffered -= size
        self._granted -= size
        if st.remote_closed:
            return  # the peer sends nothing more: no credit to give back
        st.unacked += size
        if st.unacked < st.recv_target >> 1:
            return
        delta = st.unacked
        st.unacked = 0
        if st.buffered == 0 and st.recv_target < self._max_window:
            grow = min(st.recv_target, self._max_window - st.recv_target, max(0, self._receive_budget - self._granted - delta))
            st.recv_target += grow
            delta += grow
        st.recv_window += delta
        self._granted += delta
        self._out.append(_HEADER.pack(VERSION, _T_WINDOW_UPDATE, 0, stream_id, 4) + delta.to_bytes(4, "big"))

    def send_ping(self, now: float) -> bytes:
        """Queue a PING; the matching ``PongReceived`` carries ``now`` back. Returns the opaque value."""
        self._ping_counter += 1
        opaque = self._ping_counter.to_bytes(PING_PAYLOAD_SIZE, "big")
        if len(self._pings) >= MAX_OUTSTANDING_PINGS:
            del self._pings[next(iter(self._pings))]
        self._pings[opaque] = now
        self._frame(_T_PING, 0, 0, opaque)
        return opaque

    def go_away(self, code: int = 0, reason: str = "") -> None:
        """Queue GO_AWAY: we open no more streams and refuse the peer's new ones (§3.8)."""
        if not self._local_going_away:
            self._local_going_away = True
            self._frame(_T_GO_AWAY, 0, 0, _encode_code_reason(code, reason))

    def statistics(self) -> MuxStatistics:
        return MuxStatistics(
            local_streams=self._local_open,
            remote_streams=self._remote_open,
            receive_buffered=sum(st.buffered for st in self._streams.values()),
            outstanding_pings=len(self._pings),
            going_away=self._local_going_away or self._remote_going_away,
        )

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed decrypted bytes from the peer; return the events they complete.

        DATA payloads are not buffered until their frame is complete: each call
        yields the payload bytes it carries at once (``DataReceived.data`` may be
        a memoryview of ``data``; copy it to keep it past the next call if
        ``data`` is a reused buffer). Raises RemoteProtocolError on any
        violation; the connection is then unusable (every later call raises the
        same error) and should be closed.
        """
        collector = _EventCollector()
        self.receive_data_into(data, collector)
        return collector.events

    def receive_data_into(self, data: bytes | bytearray | memoryview, sink: MuxEventSink) -> None:
        """``receive_data``, but each event is a call on ``sink`` (no event objects: the hot path).

        The calls are made in the order ``receive_data`` would list the events;
        on a violation the calls already made stand and RemoteProtocolError is raised.
        """
        if self._error is not None:
            raise RemoteProtocolError(self._error.code, self._error.message)
        if type(data) is not bytes:
            data = bytes(data)  # payload views below must not pin a buffer the caller reuses
        try:
            if self._data_left or self._header is not None or self._partial or not self._receive_unary(data, sink):
                self._parse(data, memoryview(data), sink)
        except RemoteProtocolError as exc:
            self._error = exc
            self._partial = bytearray()
            raise

    def _parse(self, data: bytes, view: memoryview, sink: MuxEventSink) -> None:
        pos, end = 0, len(view)
        partial = self._partial
        unpack = _HEADER.unpack_from
        while pos < end:
            left = self._data_left
            if left:  # inside a DATA payload: hand over what is here
                n = min(left, end - pos)
                if n == end:
                    chunk: bytes | memoryview = data  # the whole buffer is payload: no copy, no view
                else:
                    chunk = bytes(view[pos : pos + n]) if n <= _SMALL_COPY else view[pos : pos + n]
                pos += n
                self._data_left = left - n
                self._data_chunk(chunk, sink)
                if not self._data_left:
                    self._data_done(sink)
                continue
            if self._header is None:
                if not partial and end - pos >= HEADER_SIZE:
                    header = unpack(view, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(partial), end - pos)
                    partial += view[pos : pos + take]
                    pos += take
                    if len(partial) < HEADER_SIZE:
                        return
                    header = unpack(partial, 0)
                    partial.clear()
                version, ftype, flags, sid, length = header
                if ftype == _DATA and version == VERSION and not flags & ~_FIN and sid and length <= MAX_DATA_PAYLOAD:
                    kind = _K_DATA  # the usual frame: the checks of _check_header, inline
                elif ftype == _T_OPEN and version == VERSION and not flags and sid and 0 < length <= MAX_PROTOCOL_NAME:
                    kind = _K_OPEN  # the other one of every call, as inline
                else:
                    kind = _check_header(version, ftype, flags, sid, length)
                if kind is _K_DATA:
                    st = self._streams.get(sid)
                    if st is None or st.remote_closed or length > st.recv_window or end - pos < length:
                        self._data_start(flags, sid, length, sink)  # split payload, or an error, or a gone stream
                        continue
                    # Fast path, the usual case: the whole payload is here and the stream is open.
                    # State first, then the sink's calls (they may call back into the mux).
                    st.recv_window -= length
                    st.buffered += length
                    if flags & _FIN:
                        self._remote_fin(sid, st)
                        if not length:
                            sink.stream_ended(sid)
                            continue
                        chunk = bytes(view[pos : pos + length]) if length <= _SMALL_COPY else view[pos : pos + length]
                        pos += length
                        sink.data_ended(sid, chunk)
                    elif length:
                        chunk = bytes(view[pos : pos + length]) if length <= _SMALL_COPY else view[pos : pos + length]
                        pos += length
                        sink.data_received(sid, chunk)
                    continue
                if end - pos >= length:  # the whole control frame is here: no parser state to keep
                    payload = bytes(view[pos : pos + length])
                    pos += length
                    if kind is _K_OPEN and end - pos > HEADER_SIZE:
                        # A unary request (§3.11): the stream's one DATA with FIN right behind its OPEN?
                        dversion, dtype, dflags, dsid, dlength = unpack(view, pos)
                        if (
                            dsid == sid and dtype == _DATA and dflags == _FIN and dversion == VERSION
                            and 0 < dlength <= MAX_DATA_PAYLOAD and end - pos - HEADER_SIZE >= dlength
                        ):
                            pos += HEADER_SIZE
                            self._open_with_data(sid, payload, view[pos : pos + dlength], sink)
                            pos += dlength
                            continue
                    self._handle(kind, flags, sid, payload, sink)
                    continue
                self._header = (kind, flags, sid, length)
            kind, flags, sid, length = self._header
            if not partial and end - pos >= length:
                payload = bytes(view[pos : pos + length])
                pos += length
            else:
                take = min(length - len(partial), end - pos)
                partial += view[pos : pos + take]
                pos += take
                if len(partial) < length:
                    return
                payload = bytes(partial)
                partial.clear()
            self._header = None
            self._handle(kind, flags, sid, payload, sink)

    def _receive_unary(self, data: bytes, sink: MuxEventSink) -> bool:
        """The two shapes of a small call's frame, whole (§3.11): a response - one DATA with FIN -
        or a request - OPEN followed by its stream's one DATA with FIN. Handled here, without
        ``_parse``'s general loop; False (nothing done) for anything else."""
        size = len(data)
        if size <= HEADER_SIZE:
            return False
        version, ftype, flags, sid, length = _HEADER.unpack_from(data)
        if version != VERSION or not sid:
            return False
        if ftype == _DATA:
            if flags != _FIN or size != HEADER_SIZE + length or length > MAX_DATA_PAYLOAD:
                return False
            st = self._streams.get(sid)
            if st is None or st.remote_closed or length > st.recv_window:
                return False  # an error, or a stream already gone: the general path says which
            st.recv_window -= length
            st.buffered += length
            self._remote_fin(sid, st)
            sink.data_ended(sid, data[HEADER_SIZE:] if length <= _SMALL_COPY else memoryview(data)[HEADER_SIZE:])
            return True
        start = HEADER_SIZE + length  # of the DATA frame, if this is an OPEN
        if ftype != _T_OPEN or flags or not 0 < length <= MAX_PROTOCOL_NAME or size <= start + HEADER_SIZE:
            return False
        dversion, dtype, dflags, dsid, dlength = _HEADER.unpack_from(data, start)
        if dsid != sid or dtype != _DATA or dflags != _FIN or dversion != VERSION or size != start + HEADER_SIZE + dlength:
            return False
        if dlength > MAX_DATA_PAYLOAD:
            return False
        start += HEADER_SIZE
        self._open_with_data(sid, data[HEADER_SIZE : HEADER_SIZE + length], data[start:] if dlength <= _SMALL_COPY else memoryview(data)[start:], sink)
        return True

    def _open_with_data(self, sid: int, name: bytes, data: bytes | memoryview, sink: MuxEventSink) -> None:
        """An OPEN with its stream's only DATA (with FIN, ``data`` not empty) right behind it."""
        st, protocol = self._open_remote(sid, name)
        if st is None:
            return  # refused (RESET queued): the DATA is dropped, as for any stream already gone
        length = len(data)
        st.recv_window -= length  # INITIAL_WINDOW >= MAX_DATA_PAYLOAD: always within
        st.buffered += length
        self._remote_fin(sid, st)
        sink.unary_opened(sid, protocol, data if type(data) is bytes or length > _SMALL_COPY else bytes(data))

    def _data_start(self, flags: int, sid: int, length: int, sink: MuxEventSink) -> None:
        """A DATA header: check stream state and window before any payload is accepted (§3.4)."""
        st = self._streams.get(sid)
        if st is None:
            self._check_known(sid, FrameType.DATA)
            self._data_stream = None  # stream already gone (we reset it): drop in-flight data
        else:
            if st.remote_closed:
                raise RemoteProtocolError(ErrorCode.STREAM_STATE, f"DATA on stream {sid} after FIN")
            if length > st.recv_window:
                raise RemoteProtocolError(
                    ErrorCode.LIMIT_EXCEEDED, f"{length} bytes on stream {sid} exceed its window of {st.recv_window} (§3.4)"
                )
            st.recv_window -= length
            self._data_stream = st
        self._data_sid = sid
        self._data_fin = bool(flags & _FIN)
        self._data_left = length
        if not length:
            self._data_done(sink)

    def _data_chunk(self, chunk: bytes | memoryview, sink: MuxEventSink) -> None:
        st = self._data_stream
        if st is not None and self._streams.get(self._data_sid) is st:
            st.buffered += len(chunk)
            sink.data_received(self._data_sid, chunk)

    def _data_done(self, sink: MuxEventSink) -> None:
        st, sid = self._data_stream, self._data_sid
        self._data_stream = None
        if self._data_fin and st is not None and self._streams.get(sid) is st:
            self._remote_fin(sid, st)
            sink.stream_ended(sid)

    def _remote_fin(self, sid: int, st: _Stream) -> None:
        """The peer's FIN: no more credit to hold for it; the stream goes once both sides ended.

        Done before the sink hears of it, so the sink sees the stream already closed.
        """
        st.remote_closed = True
        self._granted -= st.recv_window
        st.recv_window = 0
        if st.local_closed:
            self._forget(sid, st)

    def _handle(self, kind: FrameType, flags: int, sid: int, payload: bytes, sink: MuxEventSink) -> None:
        """A complete non-DATA frame."""
        if kind is _K_OPEN:  # first: every call opens a stream
            st, protocol = self._open_remote(sid, payload)
            if st is not None:
                sink.stream_opened(sid, protocol)
        elif kind is _K_WINDOW_UPDATE:
            st = self._streams.get(sid)
            if st is None:
                self._check_known(sid, kind)
                return
            delta = int.from_bytes(payload, "big")
            if st.send_window + delta > MAX_WINDOW:
                raise RemoteProtocolError(
                    ErrorCode.LIMIT_EXCEEDED, f"WINDOW_UPDATE makes stream {sid}'s window {st.send_window + delta} > {MAX_WINDOW} (§3.4)"
                )
            st.send_window += delta
            sink.window_updated(sid, delta)
        elif kind is _K_RESET:
            code, reason = _decode_code_reason(payload, "RESET")
            st = self._streams.get(sid)
            if st is None:
                self._check_known(sid, kind)
                return
            self._forget(sid, st)
            sink.stream_reset(sid, code, reason)
        elif kind is _K_PING:
            if flags & _ACK:
                sent_at = self._pings.pop(payload, None)
                if sent_at is not None:  # a reply to a forgotten ping is ignored (§3.9)
                    sink.pong_received(payload, sent_at)
            else:
                self._frame(_T_PING, _ACK, 0, payload)
                sink.ping_received(payload)
        else:  # GO_AWAY
            code, reason = _decode_code_reason(payload, "GO_AWAY")
            self._remote_going_away = True
            sink.go_away_received(code, reason)

    def _open_remote(self, sid: int, payload: bytes) -> tuple[_Stream | None, str]:
        """The peer's OPEN (§3.5): its stream, or None if refused (a RESET is queued). Raises on violations."""
        protocol = validate_protocol_name(payload)
        if (sid & 1) == (1 if self.initiator else 0):
            raise RemoteProtocolError(ErrorCode.STREAM_STATE, f"peer opened stream {sid} with our parity (§3.5)")
        if sid <= self._last_remote_id:
            raise RemoteProtocolError(ErrorCode.STREAM_STATE, f"stream id {sid} not above the last opened {self._last_remote_id} (§3.5)")
        if self._remote_going_away:
            raise RemoteProtocolError(ErrorCode.STREAM_STATE, "OPEN after the peer's own GO_AWAY (§3.8)")
        self._last_remote_id = sid
        if self._local_going_away:
            self._frame(_T_RESET, 0, sid, _encode_code_reason(ErrorCode.CONNECTION_CLOSED, "connection is going away"))
            return None, protocol
        if self._remote_open >= self._max_streams:
            self._frame(_T_RESET, 0, sid, _encode_code_reason(ErrorCode.LIMIT_EXCEEDED, f"more than {self._max_streams} concurrent streams"))
            return None, protocol
        st = self._streams[sid] = _Stream(local=False)
        self._remote_open += 1
        self._granted += INITIAL_WINDOW
        return st, protocol

    def _check_known(self, sid: int, kind: FrameType) -> None:
        """A frame for a stream that is not open: fine if it existed, fatal if never opened (§3.7)."""
        ours = (sid & 1) == (1 if self.initiator else 0)
        existed = sid < self._next_local_id if ours else sid <= self._last_remote_id
        if not existed:
            raise RemoteProtocolError(ErrorCode.STREAM_STATE, f"{kind.name} on stream {sid}, which was never opened (§3.7)")

    def _maybe_forget(self, sid: int, st: _Stream) -> None:
        if st.local_closed and st.remote_closed:
            self._forget(sid, st)

    def _forget(self, sid: int, st: _Stream) -> None:
        del self._streams[sid]
        self._granted -= st.recv_window + st.buffered
        if st.local:
            self._local_open -= 1
        else:
            self._remote_open -= 1
