"""The WAN relay of benchmarks/bench_wan.py: its timing rules with a fake clock, and bytes through real sockets.

benchmarks/wan_link.py decides when each chunk leaves (sans-IO, time is an argument);
benchmarks/wan_relay.py drives it over loopback TCP.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from wan_link import MBIT, LinkSchedule  # noqa: E402
from wan_relay import Relay, RelayProcess  # noqa: E402


def test_delay_only_adds_the_one_way_delay():
    link = LinkSchedule(delay=0.05)
    assert link.accept(10.0, 1000) == pytest.approx(10.05)
    assert link.accept(10.2, 10**9) == pytest.approx(10.25)  # no rate: size costs nothing
    assert link.backlog(10.2) == 0.0


def test_rate_serialises_chunks_first_in_first_out():
    link = LinkSchedule(delay=0.01, rate=100 * MBIT)  # 12.5 MB/s
    first = link.accept(0.0, 125_000)  # 10 ms to send
    assert first == pytest.approx(0.02)
    second = link.accept(0.001, 125_000)  # waits for the first: sent 10..20 ms
    assert second == pytest.approx(0.03)
    assert link.backlog(0.001) == pytest.approx(0.019)
    assert link.backlog(0.5) == 0.0
    later = link.accept(1.0, 12_500)  # the link was idle: 1 ms to send, then the delay
    assert later == pytest.approx(1.011)


def test_delivery_times_never_decrease():
    link = LinkSchedule(delay=0.02, rate=1 * MBIT)
    times = [link.accept(t * 0.0007, size) for t, size in enumerate([5000, 1, 0, 70_000, 3, 0, 16_384])]
    assert times == sorted(times)


def test_empty_chunk_eof_arrives_after_the_data_before_it():
    link = LinkSchedule(delay=0.05, rate=1 * MBIT)
    data = link.accept(0.0, 125_000)  # 1 s to send
    eof = link.accept(0.1, 0)
    assert eof >= data == pytest.approx(1.05)


@pytest.mark.parametrize("delay,rate", [(-0.01, None), (float("inf"), None), (0.0, 0.0), (0.0, -5.0),
                                        (0.0, float("nan")), (float("nan"), None)])
def test_bad_link_parameters_are_refused(delay, rate):
    with pytest.raises(ValueError):
        LinkSchedule(delay, rate)
    with pytest.raises(ValueError):
        Relay(1, delay=delay, rate=rate)


def test_negative_size_is_refused():
    with pytest.raises(ValueError):
        LinkSchedule().accept(0.0, -1)


def test_bytes_pass_unchanged_both_ways_over_real_sockets():
    """An echo server behind the relay: 1 MiB of random bytes comes back identical, after at least
    two one-way delays, and the relay's half-close reaches the far side."""
    payload = os.urandom(1 << 20)
    delay = 0.02

    async def main() -> tuple[bytes, float]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()  # EOF seen: the client's half-close passed through

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        relay = Relay(server.sockets[0].getsockname()[1], delay=delay, rate=400 * MBIT)
        port = await relay.start()
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t0 = loop.time()
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 30)
            elapsed = loop.time() - t0
            writer.close()
        finally:
            await relay.aclose()
            server.close()
        return got, elapsed

    got, elapsed = asyncio.run(main())
    assert got == payload
    assert elapsed >= 2 * delay


def test_relay_program_relays_and_changes_its_delay_on_request():
    """``wan_relay.py`` as bench_wan.py runs it: RELAY/READY lines, then DELAY acknowledged; bytes pass."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        def echo_once() -> None:
            conn, _ = server.accept()
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

        thread = threading.Thread(target=echo_once, daemon=True)
        thread.start()
        target = server.getsockname()[1]
        with RelayProcess([target], delay=0.0, rate=100 * MBIT) as relay:
            relay.set_delay(0.01)
            assert relay.delay == 0.01
            with socket.create_connection(("127.0.0.1", relay.ports[target]), timeout=10) as conn:
                conn.sendall(b"through the relay")
                conn.shutdown(socket.SHUT_WR)
                got = b""
                while data := conn.recv(65536):
                    got += data
        thread.join(10)
    assert got == b"through the relay"
