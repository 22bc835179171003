"""Stream message framing: a 32-bit big-endian length prefix, then the payload.

See spec/tensors.md §6 ("Message framing"). ``encode_frame`` builds one frame;
``FrameDecoder`` is a sans-IO incremental parser in the style of h11: feed it bytes
as they arrive with ``receive_data`` (``b""`` means the stream ended) and pull whole
payloads with ``next_frame``. A
declared length over the limit raises ``RemoteProtocolError(LIMIT_EXCEEDED)`` as soon
as the 4-byte prefix is complete, before any of the body is buffered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from biopetals.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from biopetals.protocol.limits import MAX_FRAME_BYTES

__all__ = ["LENGTH_PREFIX_BYTES", "encode_frame", "FrameDecoder", "FrameDecoderStatistics"]

#: Size of the length prefix (spec/tensors.md §6.1).
LENGTH_PREFIX_BYTES: Final = 4


def encode_frame(payload: bytes, *, max_frame_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """Return ``payload`` with its length prefix. Empty or oversize payloads are a caller bug."""
    size = len(payload)
    if size == 0:
        raise LocalProtocolError(ErrorCode.MALFORMED, "a frame payload must not be empty (spec/tensors.md §6.2)")
    if size > max_frame_bytes:
        raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"frame payload of {size} bytes > limit {max_frame_bytes}")
    return size.to_bytes(LENGTH_PREFIX_BYTES, "big") + bytes(payload)


@dataclass(frozen=True)
class FrameDecoderStatistics:
    """What a decoder holds right now (trio-style ``statistics()``)."""

    buffered_bytes: int  # bytes received but not yet returned as frames
    pending_frame_bytes: int | None  # declared length of the frame being received, if its prefix is complete
    frames_decoded: int


class FrameDecoder:
    """Incremental frame parser for one byte stream (spec/tensors.md §6.3).

    After it raises ``RemoteProtocolError`` the stream is unusable: every later call
    raises the same error, since frame boundaries are lost.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= MAX_FRAME_BYTES:
            raise LocalProtocolError(ErrorCode.LIMIT_EXCEEDED, f"max_frame_bytes must be in [1, {MAX_FRAME_BYTES}]")
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self._start = 0  # read offset into _buffer; compacted lazily to avoid O(n^2) copies
        self._pending: int | None = None  # declared length of the current frame
        self._error: RemoteProtocolError | None = None
        self._frames = 0
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Append bytes received from the peer; ``b""`` signals the end of the stream.

        Raises ``RemoteProtocolError`` as soon as a complete length prefix is invalid.
        """
        self._raise_if_failed()
        if self._eof:
            raise LocalProtocolError(ErrorCode.CONNECTION_CLOSED, "receive_data after the end of the stream")
        if not data:
            self._eof = True
            return
        if self._start and self._start * 2 >= len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data
        self._read_prefix()

    def next_frame(self) -> bytes | None:
        """Return the next complete payload, or None until more data arrives."""
        self._raise_if_failed()
        self._read_prefix()
        if self._pending is None or len(self._buffer) - self._start < self._pending:
            if self._eof and not self.at_boundary:
                self._fail(ErrorCode.MALFORMED, "stream ended inside a frame (spec/tensors.md §6.3)")
            return None
        end = self._start + self._pending
        with memoryview(self._buffer) as view:  # one copy, and release the export before resizing
            payload = bytes(view[self._start : end])
        self._start = end
        self._pending = None
        self._frames += 1
        # The next prefix is checked by the next call, so a frame is never lost to an error
        # that belongs to the frame after it.
        return payload

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is buffered: the stream may end cleanly here (§6.3)."""
        return self._pending is None and len(self._buffer) == self._start

    def statistics(self) -> FrameDecoderStatistics:
        return FrameDecoderStatistics(
            buffered_bytes=len(self._buffer) - self._start,
            pending_frame_bytes=self._pending,
            frames_decoded=self._frames,
        )

    def _read_prefix(self) -> None:
        if self._pending is not None or len(self._buffer) - self._start < LENGTH_PREFIX_BYTES:
            return
        prefix_end = self._start + LENGTH_PREFIX_BYTES
        size = int.from_bytes(self._buffer[self._start : prefix_end], "big")
        if size == 0:
            self._fail(ErrorCode.MALFORMED, "zero-length frame (spec/tensors.md §6.2)")
        if size > self._max:
            self._fail(ErrorCode.LIMIT_EXCEEDED, f"frame declares {size} bytes > limit {self._max}")
        self._start = prefix_end
        self._pending = size

    def _fail(self, code: ErrorCode, message: str) -> None:
        self._error = RemoteProtocolError(code, message)
        self._buffer = bytearray()  # drop what we hold: nothing more will be parsed
        self._start = 0
        raise self._error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RemoteProtocolError(self._error.code, self._error.message)
