"""A raw peer: TCP, the handshake and the multiplexer driven by hand, frame by frame.

Transport checks need to send what a well-behaved ``transport.Host`` never would (a
wrong key, a corrupt tag, a frame of version 2) and to see exactly what comes back
(a Rejection, a RESET code, a GO_AWAY, a close). This drives the sans-IO handshake and
secure channel of ``biopetals.protocol`` over a plain asyncio socket and parses mux
frames itself (spec/transport.md §2-§3), trusting nothing the peer sends.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass

from biopetals.protocol.errors import ProtocolError
from biopetals.protocol.framing import FrameDecoder
from biopetals.protocol.handshake import Handshake, HandshakeResult, Role
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.multiaddr import Multiaddr

__all__ = ["RawPeer", "MuxFrame", "connect_tcp", "read_some", "HEADER"]

HEADER = struct.Struct(">BBHII")
DATA, WINDOW_UPDATE, PING, GO_AWAY, OPEN, RESET = range(6)
FIN, ACK = 1, 2


@dataclass
class MuxFrame:
    version: int
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def code(self) -> int | None:
        return int.from_bytes(self.payload[:4], "big") if self.type in (RESET, GO_AWAY) and len(self.payload) >= 4 else None

    @property
    def reason(self) -> str:
        return self.payload[4:].decode("utf-8", "replace")


def frame(ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0, version: int = 1) -> bytes:
    return HEADER.pack(version, ftype, flags, stream_id, len(payload)) + payload


async def connect_tcp(addr: str, timeout: float = 5.0):
    ma = Multiaddr.parse(addr)
    return await asyncio.wait_for(asyncio.open_connection(ma.host, ma.port), timeout)


async def read_some(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """Bytes available within ``timeout`` (b"" = the peer closed; None = nothing arrived)."""
    try:
        return await asyncio.wait_for(reader.read(65536), timeout)
    except TimeoutError:
        return None
    except (ConnectionError, OSError):
        return b""


async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes; (bytes, closed within ``timeout``)."""
    got = bytearray()
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (left := end - loop.time()) > 0:
        chunk = await read_some(reader, left)
        if chunk is None:
            break
        if not chunk:
            return bytes(got), True
        got += chunk
    return bytes(got), False


class RawPeer:
    """One connection to the peer under test, as initiator, after a successful handshake."""

    def __init__(self, reader, writer, result: HandshakeResult, msg2_len: int) -> None:
        self.reader, self.writer, self.result = reader, writer, result
        self.channel = result.channel
        self.msg2_len = msg2_len
        self._plain = bytearray()
        self.closed = False
        self.next_stream_id = 1

    @classmethod
    async def connect(cls, addr: str, swarm_key: bytes | None, *, timeout: float = 10.0) -> "RawPeer":
        ma = Multiaddr.parse(addr)
        reader, writer = await connect_tcp(addr, timeout)
        hs = Handshake(Role.INITIATOR, Identity.generate(), swarm_key, expected_peer_id=ma.peer_id)
        writer.write(hs.data_to_send())
        msg2_len = 0
        try:
            async with asyncio.timeout(timeout):
                while not hs.is_done:
                    data = await reader.read(65536)
                    if not msg2_len and len(data) >= 2:
                        msg2_len = int.from_bytes(data[:2], "big")
                    try:
                        hs.receive_data(data)
                    finally:
                        writer.write(hs.data_to_send())
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, hs.result, msg2_len)

    @property
    def peer_id(self) -> PeerId:
        return self.result.remote_peer_id

    def send_plain(self, data: bytes) -> None:
        """Mux bytes through the secure channel."""
        self.writer.write(bytes(self.channel.encrypt(data)))

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto TCP (for corrupt secure-channel frames)."""
        self.writer.write(data)

    def send_frame(self, ftype: int, stream_id: int, payload: bytes = b"", flags: int = 0, version: int = 1) -> None:
        self.send_plain(frame(ftype, stream_id, payload, flags, version))

    def open_stream(self, protocol: str, message: bytes | None = None, *, fin: bool = True) -> int:
        """OPEN (+ one length-prefixed message, + FIN); returns the stream id."""
        sid = self.next_stream_id
        self.next_stream_id += 2
        out = frame(OPEN, sid, protocol.encode("ascii"))
        if message is not None:
            out += frame(DATA, sid, len(message).to_bytes(4, "big") + message, FIN if fin else 0)
        self.send_plain(out)
        return sid

    async def next_frame(self, timeout: float) -> MuxFrame | None:
        """The next mux frame, None if the peer closed (or nothing arrived in time: TimeoutError)."""
        async with asyncio.timeout(timeout):
            while True:
                if len(self._plain) >= HEADER.size:
                    v, t, f, sid, n = HEADER.unpack_from(self._plain)
                    if n > 1 << 20:
                        raise ProtocolError(1, f"peer sent a mux frame declaring {n} bytes")
                    if len(self._plain) >= HEADER.size + n:
                        payload = bytes(self._plain[HEADER.size:HEADER.size + n])
                        del self._plain[:HEADER.size + n]
                        return MuxFrame(v, t, f, sid, payload)
                if self.closed:
                    return None
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    self.channel.receive_data(b"")
                    continue
                self.channel.receive_data(data)
                while (p := self.channel.next_plaintext()) is not None:
                    self._plain += p

    async def frames_until(self, pred, timeout: float) -> list[MuxFrame]:
        """Frames until one satisfies ``pred`` (last in the list) or the peer closes."""
        got = []
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            f = await self.next_frame(max(0.01, end - loop.time()))
            if f is None:
                return got
            got.append(f)
            if pred(f):
                return got

    async def read_message(self, sid: int, timeout: float) -> bytes | None:
        """One length-prefixed message of stream ``sid`` (None if reset or closed first); grants no credit."""
        frames = FrameDecoder()  # spec/tensors.md §6: a bad length raises RemoteProtocolError (the check fails)
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            message = frames.next_frame()
            if message is not None:
                return message
            f = await self.next_frame(max(0.01, end - loop.time()))
            if f is None:
                return None
            if f.stream_id == sid and f.type == DATA:
                frames.receive_data(f.payload)
            elif f.stream_id == sid and f.type == RESET:
                return None
            elif f.type == PING and not f.flags & ACK:
                self.send_frame(PING, 0, f.payload, ACK)

    async def ping(self, timeout: float = 5.0) -> bool:
        """PING with fresh bytes; True when the matching PING+ACK arrives (other frames skipped)."""
        opaque = os.urandom(8)
        self.send_frame(PING, 0, opaque)
        frames = await self.frames_until(lambda f: f.type == PING and f.flags & ACK and f.payload == opaque, timeout)
        return bool(frames) and frames[-1].payload == opaque and frames[-1].type == PING

    def close(self) -> None:
        self.writer.close()
