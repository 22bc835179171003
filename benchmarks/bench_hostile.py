"""Hostile-peer benchmark (issue 21): a real node under each attack, against the same node quiet.

Starts one ``biopetals-node`` on 127.0.0.1 serving a tiny random Llama checkpoint, with
the common 1024-descriptor limit (``prlimit``), and runs each attack of issue 21 for a
few seconds, one after another. For each attack it prints, in one table: the node's
resident memory and open descriptors (quiet, and the most seen during the attack), the
median latency of an honest client's stateless Forward over the node's blocks (quiet,
and during the attack), whether the honest answers stayed exact (compared with the
quiet answer, bit for bit, fp32), and what the attack achieved (the bound it hit).

Attacks (tests/support_hostile.py has the attacker's side; loopback only):

1. one insider connection, 16 streams each declaring a 128 MiB message and sending up to 100 MiB;
2. 1500 held TCP connections that never finish a handshake, half of them sending keyless garbage
   (3: the node's log growth is reported for this one);
4. 40 Steps whose next hop is an unknown peer at an address we listen on;
5. 1000 streams (4 insiders) that never send a first message;
6. one insider's 6 concurrent maximum-size Forwards (32 x 256 tokens each; the node computes
   them in slices of --compute-slice-tokens, node/slices.py, so the honest Forward runs between
   two slices; ``--unsliced`` starts the node with slices of 8192 tokens, as before slicing, to
   measure the baseline in the same conditions);
7. 64 and then 1000 identities from this host storing announcements under one block key;
8. one insider's long session prefills: 2 sessions each re-prefilling 4096 tokens (``truncate`` to
   position 0) several times; the honest client here runs a 1-token decode step in a session of
   its own instead of a Forward (the node computes each prefill in column chunks of
   --compute-slice-tokens over the session's cache, so the honest step runs between two chunks;
   ``--unsliced``: the node computes a prefill of up to 8192 tokens whole, as before).

    .venv/bin/python benchmarks/bench_hostile.py [--unsliced] [--attacks 6 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support_hostile import half_open_connections, partial_messages, process_usage, silent_streams  # noqa: E402
from support_models import make_tiny_checkpoint  # noqa: E402
from support_swarm import RawClient, Swarm  # noqa: E402

from biopetals.dht import messages as dm  # noqa: E402
from biopetals.dht import params as dht_params  # noqa: E402
from biopetals.dht.ids import block_key, key_id  # noqa: E402
from biopetals.dht.records import sign_record, to_ms  # noqa: E402
from biopetals.models.config import model_info  # noqa: E402
from biopetals.protocol.envelope import PROTOCOL_NAME  # noqa: E402
from biopetals.protocol.identity import Identity  # noqa: E402
from biopetals.protocol.messages import Forward, ForwardResult, Hop, OpenSession, Step, StepResult  # noqa: E402
from biopetals.protocol.multiaddr import Multiaddr  # noqa: E402
from biopetals.transport.admission import raise_descriptor_limit  # noqa: E402
from biopetals.transport.host import Host  # noqa: E402

MiB = 1 << 20
FD_LIMIT = 1024


class Bench:
    def __init__(self, swarm: Swarm, node, model: str) -> None:
        import torch

        self.swarm, self.node, self.model = swarm, node, model
        torch.manual_seed(0)
        self.hidden = torch.randn(1, 16, 64)
        self.expected = None
        self.rows: list[tuple[str, ...]] = []
        self.decode: tuple[object, bytes, int] | None = None  # the honest session: stream, id, last step id
        self.decode_expected = None
        self.unsliced = False

    async def honest(self, client: RawClient) -> tuple[float, bool]:
        """One honest Forward: seconds, and whether the answer is the quiet one."""
        started = time.perf_counter()
        reply = await client.request(self.node.addr, Forward(model=self.model, start=0, end=4, codec="f32", hidden=self.hidden), "f32")
        elapsed = time.perf_counter() - started
        assert isinstance(reply, ForwardResult), reply
        if self.expected is None:
            self.expected = reply.hidden
        return elapsed, bool((reply.hidden == self.expected).all())

    async def honest_decode(self, client: RawClient) -> tuple[float, bool]:
        """One honest 1-token decode step at position 1 of a session of its own (``truncate`` back to 1
        column each time, so every answer is the same): seconds, and whether it is the quiet one."""
        if self.decode is None:
            opening = OpenSession(model=self.model, start=0, end=4, max_length=8, batch_size=1, codec="f32")
            stream, opened = await client.open_session(self.node.addr, opening)
            first = Step(session_id=opened.session_id, step_id=1, position=0, hidden=self.hidden[:, :1])
            assert isinstance(await client.exchange(stream, first, "f32"), StepResult)
            self.decode = (stream, opened.session_id, 1)
        stream, session_id, step_id = self.decode
        self.decode = (stream, session_id, step_id + 1)
        step = Step(session_id=session_id, step_id=step_id + 1, position=1, hidden=self.hidden[:, 1:2], truncate=1)
        started = time.perf_counter()
        reply = await client.exchange(stream, step, "f32")
        elapsed = time.perf_counter() - started
        assert isinstance(reply, StepResult), reply
        if self.decode_expected is None:
            self.decode_expected = reply.hidden
        return elapsed, bool((reply.hidden == self.decode_expected).all())

    async def measure(self, name: str, attack, result, decode: bool = False) -> None:
        """Run ``attack()`` (a coroutine) while an honest client calls (a Forward, or with ``decode`` a
        session's decode step) and usage is sampled."""
        pid = self.node.pid
        honest = self.honest_decode if decode else self.honest
        async with RawClient(self.swarm.swarm_key, timeout=60) as client:
            quiet_latency = [(await honest(client))[0] for _ in range(5)]
            quiet = process_usage(pid)
            log_before = os.path.getsize(self.node.log_path)
            task = asyncio.ensure_future(attack())
            peak_rss, peak_fds, latencies, exact = quiet.rss, quiet.fds, [], True
            await asyncio.sleep(0.2)
            while not task.done() or not latencies:
                usage = process_usage(pid)
                peak_rss, peak_fds = max(peak_rss, usage.rss), max(peak_fds, usage.fds)
                elapsed, same = await honest(client)
                latencies.append(elapsed)
                exact &= same
                await asyncio.sleep(0.1)
            outcome = await task
            usage = process_usage(pid)
            peak_rss, peak_fds = max(peak_rss, usage.rss), max(peak_fds, usage.fds)
            self.decode = None  # the session ends with the client
        logged = os.path.getsize(self.node.log_path) - log_before
        q, d = statistics.median(quiet_latency), statistics.median(latencies)
        self.rows.append((
            name, f"{quiet.rss / MiB:.0f} -> {peak_rss / MiB:.0f}", f"{quiet.fds} -> {peak_fds}",
            f"{q * 1000:.1f} -> {d * 1000:.1f} ({d / q:.1f}x)", "yes" if exact else "NO", f"{logged}", result(outcome),
        ))
        print(f"  {name}: done", file=sys.stderr)


async def run_all(bench: Bench, attacks: set[int]) -> None:
    swarm, node, addr = bench.swarm, bench.node, bench.node.addr
    maddr = Multiaddr.parse(addr)

    async def attack1():
        async with Host(Identity.generate(), swarm_key=swarm.swarm_key) as h:
            return await partial_messages(h, addr, PROTOCOL_NAME, streams=16, declared=128 * MiB, send=100 * MiB, seconds=4)

    if 1 in attacks:
        await bench.measure("1 partial messages (16 x 128 MiB)", attack1, lambda n: f"{n / MiB:.0f} MiB of body accepted (credit)")

    async def attack2():
        socks = await half_open_connections(maddr.host, maddr.port, 750)
        socks += await half_open_connections(maddr.host, maddr.port, 750, send=os.urandom(64))
        await asyncio.sleep(2)
        for s in socks:
            s.close()
        return len(socks)

    if 2 in attacks:
        await bench.measure("2+3 half-open + keyless (1500)", attack2, lambda n: f"{n} sockets opened; no EMFILE: {'Too many open files' not in node.output()}")

    async def attack4():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        async with RawClient(swarm.swarm_key, timeout=30) as client:
            opening = OpenSession(model=bench.model, start=0, end=4, max_length=64, batch_size=1, codec="f32")
            stream, opened = await client.open_session(addr, opening)
            for step_id in range(40):
                hop = Hop(peer_id=Identity.generate().peer_id, session_id=b"s" * 16, start=4, end=5,
                          addrs=(Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}"),))
                reply = await client.exchange(stream, Step(session_id=opened.session_id, step_id=step_id, position=step_id,
                                                           hidden=bench.hidden[:, :1], next=(hop,)), "f32")
                assert isinstance(reply, StepResult), reply
        await asyncio.sleep(0.5)
        dials = 0
        while True:
            try:
                listener.accept()[0].close()
                dials += 1
            except BlockingIOError:
                break
        listener.close()
        return dials

    if 4 in attacks:
        await bench.measure("4 Steps with hop addresses (40)", attack4, lambda n: f"{n} dials by the node")

    async def attack5():
        hosts = [Host(Identity.generate(), swarm_key=swarm.swarm_key) for _ in range(4)]
        for h in hosts:
            await h.__aenter__()
        try:
            streams = [s for h in hosts for s in await silent_streams(h, addr, PROTOCOL_NAME, 250)]
            await asyncio.sleep(3)
            return sum(not s.is_closed for s in streams)
        finally:
            for h in hosts:
                await h.__aexit__(None, None, None)

    if 5 in attacks:
        await bench.measure("5 silent streams (1000, 3 s)", attack5, lambda n: f"{n} held at 3 s (reset by 15 s)")

    async def attack6():
        import torch

        big = Forward(model=bench.model, start=0, end=4, codec="f32", hidden=torch.randn(32, 256, 64))
        async with RawClient(swarm.swarm_key, timeout=300) as insider:
            replies = await asyncio.gather(*(insider.request(addr, big, "f32") for _ in range(6)))
        return sum(isinstance(r, ForwardResult) for r in replies)

    if 6 in attacks:
        await bench.measure("6 max-size Forwards (6 x 32 x 256 tokens)", attack6, lambda n: f"{n} served; the honest client's turns come in between")

    key = block_key(bench.model, 0)

    def attack7(count):
        async def attack():
            sem = asyncio.Semaphore(16)
            stored = 0

            async def one():
                nonlocal stored
                who = Identity.generate()
                record = sign_record(who, key, who.peer_id.multihash, b"fake", to_ms(time.time() + 600))
                async with sem, Host(who, swarm_key=swarm.swarm_key) as h:
                    reply = dm.decode_response(await h.call(addr, dht_params.PROTOCOL, dm.encode(dm.StoreRequest((record,), ())), timeout=30))
                    stored += isinstance(reply, dm.StoreResponse) and reply.statuses == (0,)

            await asyncio.gather(*(one() for _ in range(count)))
            async with Host(Identity.generate(), swarm_key=swarm.swarm_key) as h:
                found = dm.decode_response(await h.call(addr, dht_params.PROTOCOL, dm.encode(dm.FindValueRequest((key_id(key),), ())), timeout=30))
            return stored, len(found.results[0].records)

        return attack

    for count in (64, 1000) if 7 in attacks else ():
        await bench.measure(f"7 DHT identities ({count})", attack7(count),
                            lambda r: f"{r[0]} stored; {r[1]} records under the block key (of {dht_params.MAX_SUBKEYS_PER_KEY})")
    if 8 in attacks:
        await attack_prefills(bench)


PREFILL, PREFILL_SESSIONS, PREFILL_ROUNDS = 4096, 2, 8


async def attack_prefills(bench: Bench) -> None:
    """Attack 8: one insider's sessions each prefill ``PREFILL`` tokens ``PREFILL_ROUNDS`` times (a
    ``truncate`` step back to position 0), all at once, while the honest client decodes."""
    import torch

    hidden = torch.randn(1, PREFILL, 64, generator=torch.Generator().manual_seed(8))
    opening = OpenSession(model=bench.model, start=0, end=4, max_length=PREFILL, batch_size=1, codec="f32")

    async def prefills(insider: RawClient) -> int:
        stream, opened = await insider.open_session(bench.node.addr, opening)
        served = 0
        for step_id in range(1, PREFILL_ROUNDS + 1):
            step = Step(session_id=opened.session_id, step_id=step_id, position=0, hidden=hidden, truncate=1)
            served += isinstance(await insider.exchange(stream, step, "f32"), StepResult)
        return served

    async def attack():
        async with RawClient(bench.swarm.swarm_key, timeout=300) as insider:
            return sum(await asyncio.gather(*(prefills(insider) for _ in range(PREFILL_SESSIONS))))

    await bench.measure(f"8 long prefills ({PREFILL_SESSIONS} sessions x {PREFILL_ROUNDS} x {PREFILL} tokens)", attack,
                        lambda n: f"{n} prefills served, " + ("each whole (--unsliced)" if bench.unsliced else
                                                               "in chunks: the honest steps run between them"),
                        decode=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unsliced", action="store_true",
                        help="start the node with --compute-slice-tokens 8192: a Forward or a session's prefill runs "
                             "whole, as before slicing")
    parser.add_argument("--attacks", type=int, nargs="+", choices=range(1, 9), default=list(range(1, 9)), metavar="N",
                        help="the attacks to run, 1-8 (2 includes 3; default: all)")
    args = parser.parse_args()
    node_args = ("--compute-slice-tokens", "8192") if args.unsliced else ()
    if shutil.which("prlimit") is None:
        print("needs prlimit (util-linux)", file=sys.stderr)
        return 2
    if (raise_descriptor_limit() or 1 << 20) < 4096:
        print("this process needs 4096 descriptors", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_tiny_checkpoint(Path(tmp) / "tiny", with_tokenizer=False, max_position_embeddings=PREFILL)
        with Swarm(Path(tmp)) as swarm:
            node = swarm.start_node(ckpt, "0:4", *node_args, prefix=("prlimit", f"--nofile={FD_LIMIT}:{FD_LIMIT}"))
            bench = Bench(swarm, node, model_info(ckpt).dht_prefix)
            bench.unsliced = args.unsliced
            asyncio.run(run_all(bench, set(args.attacks)))
            alive = node.alive()
    print(f"Node on 127.0.0.1 with a {FD_LIMIT}-descriptor limit, tiny Llama blocks 0:4; honest client: stateless Forward of 16 tokens (fp32; attack 8: a 1-token decode step)"
          f"{'; unsliced (--compute-slice-tokens 8192)' if args.unsliced else ''}.")
    print(f"Node alive after every attack: {alive}\n")
    print("| attack | node RSS MiB (quiet -> peak) | descriptors (quiet -> peak) | honest latency ms, median (quiet -> attack) | honest exact | log bytes | outcome |")
    print("|---|---|---|---|---|---|---|")
    for row in bench.rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
