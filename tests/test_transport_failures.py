"""Transport failures against real sockets (issue 3, "Failures"; spec/transport.md §2.6, §3.12).

Wrong swarm key, wrong peer id, garbage, a stalled handshake, and 1000 connect /
disconnect cycles that must leak neither file descriptors nor tasks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable
from typing import Any

import pytest

from biopetals.protocol.errors import ErrorCode, RemoteProtocolError
from biopetals.protocol.handshake import Handshake, Role
from biopetals.protocol.identity import Identity, PeerId
from biopetals.protocol.multiaddr import Multiaddr
from biopetals.transport.connection import TransportConfig
from biopetals.transport.host import Host

SWARM = os.urandom(32)
FAST = TransportConfig(keepalive_interval=0, handshake_timeout=0.5)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def echo(peer_id: PeerId, request: bytes) -> bytes:
    return request


async def read_until_eof(reader: asyncio.StreamReader, limit: float) -> tuple[bytes, float]:
    started = time.perf_counter()
    data = b""
    try:
        async with asyncio.timeout(limit):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return data, time.perf_counter() - started


def test_wrong_swarm_key_fails_both_sides_in_one_round_trip_and_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server:
            server.set_handler("/secret/protocol/1", echo)
            (addr,) = await server.listen()

            # A whole outsider Host: a clear error, at once.
            async with Host(Identity.generate(), swarm_key=os.urandom(32), config=FAST) as outsider:
                started = time.perf_counter()
                with pytest.raises(RemoteProtocolError) as info:
                    await outsider.call(addr, "/secret/protocol/1", b"x", timeout=5)
                assert time.perf_counter() - started < 0.5
                assert info.value.code == ErrorCode.SWARM_KEY_MISMATCH
                assert "swarm key does not match" in info.value.message and "lab.key" in info.value.message

            # A raw outsider: exactly what bytes does it get back for its message 1?
            hs = Handshake(Role.INITIATOR, Identity.generate(), os.urandom(32))
            reader, writer = await asyncio.open_connection(addr.host, addr.port)
            writer.write(hs.data_to_send())
            received, elapsed = await read_until_eof(reader, 2)
            writer.close()
            assert elapsed < 0.5  # rejected and closed after one round trip, no timeout involved
            with pytest.raises(RemoteProtocolError) as raw:
                hs.receive_data(received)
            assert raw.value.code == ErrorCode.SWARM_KEY_MISMATCH
            assert len(received) < 64  # only the short cleartext Rejection frame
            for secret in (server.peer_id.to_bytes(), server.identity.public_key, str(server.peer_id).encode(), b"/secret/protocol/1"):
                assert secret not in received

            await asyncio.sleep(0.05)
            assert server.statistics().handshakes_failed.get("SWARM_KEY_MISMATCH") == 2
            assert server.connections() == []
        assert any("swarm key does not match" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="biopetals.transport"):
        run(body())


def test_peer_id_mismatch_names_both_ids() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as client:
            (addr,) = await server.listen()
            expected = Identity.generate().peer_id
            wrong = Multiaddr(addr.kind, addr.host, addr.port, expected)
            with pytest.raises(RemoteProtocolError) as info:
                await client.connect(wrong)
            assert info.value.code == ErrorCode.PEER_ID_MISMATCH
            assert str(expected) in info.value.message and str(server.peer_id) in info.value.message
            assert client.connections() == []

    run(body())


def test_garbage_and_stalled_handshakes_are_dropped_while_others_are_served() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=FAST
        ) as client:
            server.set_handler("/echo/1", echo)
            (addr,) = await server.listen()

            async def garbage() -> float:
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
                writer.write(os.urandom(3000))
                _, elapsed = await read_until_eof(reader, 5)
                writer.close()
                return elapsed

            async def staller() -> float:
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
                first = Handshake(Role.INITIATOR, Identity.generate(), SWARM).data_to_send()
                writer.write(first[: len(first) // 2])  # half of message 1, then silence
                _, elapsed = await read_until_eof(reader, 5)
                writer.close()
                return elapsed

            async def honest() -> list[float]:
                times = []
                for i in range(20):  # served all through the bad peers' lifetime
                    started = time.perf_counter()
                    assert await client.call(addr, "/echo/1", b"%d" % i, timeout=2) == b"%d" % i
                    times.append(time.perf_counter() - started)
                    await asyncio.sleep(0.02)
                return times

            stall_task = asyncio.create_task(staller())
            garbage_task = asyncio.create_task(garbage())
            await asyncio.sleep(0.05)
            assert server.statistics().handshakes_in_progress >= 1
            honest_times = await honest()
            garbage_elapsed, stall_elapsed = await garbage_task, await stall_task
            assert garbage_elapsed < 0.5  # garbage fails at its first frame
            assert 0.4 < stall_elapsed < 1.5  # the staller hits handshake_timeout (0.5 s)
            assert max(honest_times) < 0.5
            failed = server.statistics().handshakes_failed
            assert failed.get("TIMEOUT") == 1 and sum(failed.values()) == 2
            assert server.statistics().handshakes_in_progress == 0

    run(body())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_1000_connect_disconnect_cycles_leak_no_fds_or_tasks() -> None:
    async def body() -> None:
        async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as server, Host(
            Identity.generate(), swarm_key=SWARM, config=TransportConfig(keepalive_interval=30)
        ) as client:
            server.set_handler("/echo/1", echo)
            (addr,) = await server.listen()
            conn = await client.connect(addr)
            await conn.aclose()
            await asyncio.sleep(0.05)
            fds, tasks = _open_fds(), len(asyncio.all_tasks())

            async def cycle(i: int) -> None:
                conn = await client.connect(addr)
                if i % 10 == 0:  # some cycles also use the connection
                    assert await client.call(addr.peer_id, "/echo/1", b"x") == b"x"  # type: ignore[arg-type]
                if i % 2:
                    await conn.aclose()
                else:
                    conn.close()  # a plain close must clean up just as well
                    await conn.wait_closed()

            for i in range(1000):
                await cycle(i)
            for _ in range(100):  # the server notices the last close one loop turn later
                if not server.connections() and not client.connections():
                    break
                await asyncio.sleep(0.01)
            assert server.connections() == [] and client.connections() == []
            assert server.statistics().handshakes_completed == 1001
            assert _open_fds() == fds
            assert len(asyncio.all_tasks()) == tasks

    run(body())


def test_dial_timeout_against_a_silent_listener() -> None:
    async def body() -> None:
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        try:
            async with Host(Identity.generate(), swarm_key=SWARM, config=FAST) as client:
                started = time.perf_counter()
                with pytest.raises(Exception) as info:
                    await client.connect(f"/ip4/127.0.0.1/tcp/{port}")
                assert getattr(info.value, "code", None) == ErrorCode.TIMEOUT
                assert time.perf_counter() - started < 1.5
        finally:
            silent.close()

    run(body())
