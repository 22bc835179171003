"""Stream message framing: a 32-bit big-endian length prefix, then the payload.

See spec/tensors.md §6 ("Message framing"). This module is the one implementation
of it; nothing here does I/O.

* ``encode_frame`` builds one frame.
* ``FrameAssembler`` is the receiving core, for a caller that owns the bytes not yet
  consumed (a stream with flow control, spec/transport.md §3.5). ``take(chunk)``
  takes only what it may and says how much it took; the rest stays with the caller
  (so no credit goes back for it). Once the four prefix bytes are in, the length is
  checked (§6.3: ``RemoteProtocolError`` MALFORMED for 0, LIMIT_EXCEEDED beyond the
  limit) and exposed as ``declared_length`` *before* any of the body is taken: the
  caller reserves room for it or refuses it (spec/transport.md §3.16), then calls
  ``admit()``. The body is kept as the pieces that arrived (no buffer of the declared
  size is allocated ahead, §6.3) and joined once; a body that arrived as one
  ``bytes`` chunk is returned as is, without a copy. Where it stands is one plain
  attribute, ``state`` (``BOUNDARY`` ... ``COMPLETE``, ``FAILED``), cheap to read per chunk.
* ``FrameDecoder`` is the h11-style parser over it for a caller that hands over every
  byte: ``receive_data`` (``b""`` means the stream ended) and ``next_frame``.
* ``whole_frame(data)`` is the shortcut for the common case of a chunk that is
  exactly one frame (a small call in one transport frame).
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, Union

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_FRAME_BYTES

__all__ = [
    "LENGTH_PREFIX_BYTES",
    "encode_frame",
    "frame_prefix",
    "whole_frame",
    "FrameAssembler",
    "BOUNDARY",
    "PREFIX",
    "AWAITING_ADMISSION",
    "BODY",
    "COMPLETE",
    "FAILED",
    "FrameDecoder",
    "FrameDecoderStatistics",
]

#: Size of the length prefix (spec/tensors.md §6.1).
LENGTH_PREFIX_BYTES: Final = 4

_PREFIX = struct.Struct(">I")  # reads a prefix in place: int.from_bytes of a memoryview slice copies it first
assert _PREFIX.size == LENGTH_PREFIX_BYTES

Chunk = Union[bytes, bytearray, memoryview]


#: ``frame_prefix(size)``: the length prefix of a payload of ``size`` bytes (the caller checked
#: 1 <= size <= its limit). The struct's own method: no Python call on a sender's hot path.
frame_prefix: Final = _PREFIX.pack


def encode_frame(payload: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Return ``payload`` with its length prefix. Empty or oversize payloads are a caller bug."""
    size = len(payload)
    if size == 0:
        raise LocalProtocolError(ErrorCode.MALFORMED, "a frame payload must not be empty (spec/tensors.md §6.2)")
    if size > max_frame_bytes:
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"frame payload of {size} bytes > limit {max_frame_bytes}")
    return _PREFIX.pack(size) + bytes(payload)


def whole_frame(data: Chunk, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """The payload (a copy) if ``data`` is exactly one valid frame, else None (then use a ``FrameAssembler``)."""
    size = len(data)
    if size > LENGTH_PREFIX_BYTES and _PREFIX.unpack_from(data)[0] == size - LENGTH_PREFIX_BYTES <= max_frame_bytes:
        return bytes(data[LENGTH_PREFIX_BYTES:])
    return None


# FrameAssembler states (``FrameAssembler.state``), in the order a frame goes through them.
#: Between frames: nothing held. The stream may end here (§6.3).
BOUNDARY: Final = 0
#: Some of the four prefix bytes are in.
PREFIX: Final = 1
#: The prefix is in and checked (``declared_length``); the body waits for ``admit()``.
AWAITING_ADMISSION: Final = 2
#: Admitted: the body is being taken.
BODY: Final = 3
#: The whole payload is in; ``pop_frame()`` returns it.
COMPLETE: Final = 4
#: A bad prefix was seen; frame boundaries are lost for good (§6.3).
FAILED: Final = 5


class FrameAssembler:
    """Assembles one frame at a time from chunks its caller offers (spec/tensors.md §6.3).

    ``state`` goes BOUNDARY -> PREFIX -> AWAITING_ADMISSION (``declared_length`` known,
    nothing of the body taken; ``take`` takes nothing until ``admit()``) -> BODY ->
    COMPLETE (``take`` takes nothing until ``pop_frame()``) -> BOUNDARY. With
    ``auto_admit`` AWAITING_ADMISSION is skipped. A bad prefix raises
    ``RemoteProtocolError`` and leaves it FAILED: every later ``take`` raises it again.
    ``state`` is a plain attribute (a stream reads it per chunk); the properties say the same in words.
    """

    __slots__ = ("_max", "_auto", "state", "_prefix", "declared_length", "_pieces", "body_received", "_error")

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, *, auto_admit: bool = False) -> None:
        if not 0 < max_frame_bytes <= MAX_FRAME_BYTES:  # one per stream: no helper call
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"max_frame_bytes must be in [1, {MAX_FRAME_BYTES}]")
        self._max = max_frame_bytes
        self._auto = auto_admit
        self.state = BOUNDARY
        self._prefix = b""  # prefix bytes while fewer than four are in
        #: The payload size the current frame's prefix declares (checked), or None before it is complete.
        self.declared_length: int | None = None
        self._pieces: list[Chunk] = []  # the body as it arrived
        #: Body bytes of the current frame taken so far.
        self.body_received = 0
        self._error: RemoteProtocolError | None = None

    @property
    def at_boundary(self) -> bool:
        """No byte of a frame is held or pending: the stream may end cleanly here (§6.3)."""
        return self.state == BOUNDARY

    @property
    def awaiting_admission(self) -> bool:
        """The prefix is in and checked; the body waits for ``admit()``."""
        return self.state == AWAITING_ADMISSION

    @property
    def complete(self) -> bool:
        """The whole payload is in; ``pop_frame()`` returns it."""
        return self.state == COMPLETE

    @property
    def buffered_bytes(self) -> int:
        """Bytes taken and not yet returned: a partial prefix, or the body so far."""
        return len(self._prefix) + self.body_received

    def admit(self) -> None:
        """The caller made room for ``declared_length`` bytes: the body may now be taken."""
        if self.state != AWAITING_ADMISSION:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, "admit() without a frame awaiting admission")
        self.state = BODY

    def take(self, chunk: Chunk) -> int:
        """Take what may be taken of ``chunk`` now (see the class docstring); return how many bytes.

        Keeps references to ``chunk`` (the caller must not modify it). Raises
        ``RemoteProtocolError`` once a complete prefix declares 0 (MALFORMED) or more
        than the limit (LIMIT_EXCEEDED), before taking any of the body.
        """
        state = self.state
        taken = 0
        if state <= PREFIX:
            have = len(self._prefix)
            taken = min(LENGTH_PREFIX_BYTES - have, len(chunk))
            if taken == LENGTH_PREFIX_BYTES:
                (size,) = _PREFIX.unpack_from(chunk)
            else:
                if not taken:
                    return 0  # an empty chunk
                self._prefix += bytes(chunk[:taken])
                if len(self._prefix) < LENGTH_PREFIX_BYTES:
                    self.state = PREFIX
                    return taken
                (size,) = _PREFIX.unpack(self._prefix)
                self._prefix = b""
            if size == 0:
                self._fail(ErrorCode.MALFORMED, "zero-length frame (spec/tensors.md §6.2)")
            if size > self._max:
                self._fail(ErrorCode.LIMIT_EXCEEDED, f"frame declares {size} bytes > limit {self._max} (spec/tensors.md §6.2)")
            self.declared_length = size
            if not self._auto:
                self.state = AWAITING_ADMISSION
                return taken
            state = self.state = BODY
        if state != BODY:
            if state == FAILED:
                self.raise_if_failed()
            return 0  # awaiting admission, or complete
        want = self.declared_length - self.body_received  # type: ignore[operator]
        left = len(chunk) - taken
        if left <= 0:
            return taken
        if taken == 0 and left <= want:
            self._pieces.append(chunk)  # the whole chunk is body: keep it, no view
            n = left
        else:
            n = min(left, want)
            self._pieces.append(memoryview(chunk)[taken : taken + n])
        self.body_received += n
        if n == want:
            self.state = COMPLETE
        return taken + n

    def pop_frame(self) -> bytes:
        """Return the complete payload (joined once) and start on the next frame."""
        if self.state != COMPLETE:
            raise LocalProtocolError(ErrorCode.STREAM_STATE, "pop_frame() before the frame is complete")
        pieces = self._pieces
        one = pieces[0]
        payload = one if len(pieces) == 1 and type(one) is bytes else b"".join(pieces)
        self._pieces = []
        self.body_received = 0
        self.declared_length = None
        self.state = BOUNDARY
        return payload

    def raise_if_failed(self) -> None:
        """Raise the ``RemoteProtocolError`` this assembler failed with, if any."""
        if self._error is not None:
            raise RemoteProtocolError(self._error.code, self._error.message)

    def end_of_stream(self) -> None:
        """The stream ended: fine at a boundary, else MALFORMED (a truncated frame, §6.3)."""
        self.raise_if_failed()
        if self.state != BOUNDARY:
            self._fail(ErrorCode.MALFORMED, "stream ended inside a frame (spec/tensors.md §6.3)")

    def discard(self) -> None:
        """Drop the frame being assembled (the stream is closed or failed); back to a boundary unless FAILED."""
        self._prefix = b""
        self._pieces = []
        self.body_received = 0
        self.declared_length = None
        if self.state != FAILED:
            self.state = BOUNDARY

    def _fail(self, code: ErrorCode, message: str) -> None:
        self.discard()
        self.state = FAILED
        self._error = RemoteProtocolError(code, message)
        raise RemoteProtocolError(code, message)


@dataclass(frozen=True)
class FrameDecoderStatistics:
    """What a decoder holds right now (trio-style ``statistics()``)."""

    buffered_bytes: int  # bytes received but not yet returned as frames
    pending_frame_bytes: int | None  # declared length of the frame being received, if its prefix is complete
    frames_decoded: int


class FrameDecoder:
    """Incremental frame parser for one byte stream (spec/tensors.md §6.3), over a ``FrameAssembler``.

    After it raises ``RemoteProtocolError`` the stream is unusable: every later call
    raises the same error, since frame boundaries are lost. Frames are checked one
    at a time: an error in a frame's prefix is raised after the frames before it
    were returned.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._frames_in = FrameAssembler(max_frame_bytes, auto_admit=True)
        self._queue: deque[Chunk] = deque()  # received, not yet taken by the assembler
        self._queued = 0
        self._frames = 0
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the peer; ``b""`` signals the end of the stream.

        Raises ``RemoteProtocolError`` as soon as a complete length prefix is invalid.
        """
        self._frames_in.raise_if_failed()
        if self._eof:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "receive_data after the end of the stream")
        if not data:
            self._eof = True
            return
        self._queue.append(bytes(data))  # our own copy: the caller may reuse its buffer
        self._queued += len(data)
        self._pump()

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None until more data arrives."""
        assembler = self._frames_in
        self._pump()
        if not assembler.complete:
            if self._eof and not self._queue:
                assembler.end_of_stream()
            return None
        self._frames += 1
        # The next prefix is checked by the next call, so a frame is never lost to an error
        # that belongs to the frame after it.
        return assembler.pop_frame()

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered: the stream may end cleanly here (§6.3)."""
        return not self._queue and self._frames_in.at_boundary

    def statistics(self) -> FrameDecoderStatistics:
        return FrameDecoderStatistics(
            buffered_bytes=self._queued + self._frames_in.buffered_bytes,
            pending_frame_bytes=self._frames_in.declared_length,
            frames_decoded=self._frames,
        )

    def _pump(self) -> None:
        """Offer queued bytes to the assembler until it holds a complete frame or they run out."""
        assembler, queue = self._frames_in, self._queue
        assembler.raise_if_failed()
        while queue and not assembler.complete:
            chunk = queue[0]
            try:
                n = assembler.take(chunk)
            except RemoteProtocolError:
                queue.clear()  # drop what we hold: nothing more will be parsed
                self._queued = 0
                raise
            self._queued -= n
            if n == len(chunk):
                queue.popleft()
            else:
                queue[0] = memoryview(chunk)[n:]
