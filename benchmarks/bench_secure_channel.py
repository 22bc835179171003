"""Throughput of the sans-IO secure channel alone (spec/transport.md §2.8): encrypt + decrypt MB/s.

No sockets: this is the crypto and framing floor under the transport benchmark. Run:
``python benchmarks/bench_secure_channel.py [--mib 16] [--repeat 5]``.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import os
import time

from biopetals.protocol.noise import CipherState
from biopetals.protocol.secure_channel import SecureChannel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=16, help="message size in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=256 << 10, help="bytes per receive_data call")
    args = ap.parse_args()
    k1, k2 = os.urandom(32), os.urandom(32)
    sender = SecureChannel(CipherState(k1), CipherState(k2))
    receiver = SecureChannel(CipherState(k2), CipherState(k1))
    msg = os.urandom(args.mib << 20)
    enc, dec, both = [], [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        wire = memoryview(sender.encrypt(msg))
        t1 = time.perf_counter()
        got = 0
        for i in range(0, len(wire), args.chunk):
            receiver.receive_data(wire[i : i + args.chunk])
            while (p := receiver.next_plaintext()) is not None:
                got += len(p)
        t2 = time.perf_counter()
        if got != len(msg):
            raise SystemExit("lost data")
        enc.append(t1 - t0)
        dec.append(t2 - t1)
        both.append(t2 - t0)
    mb = len(msg) / 1e6
    print(f"{args.mib} MiB message, best of {args.repeat}:")
    print(f"  encrypt           {mb / min(enc):8.0f} MB/s")
    print(f"  decrypt           {mb / min(dec):8.0f} MB/s")
    print(f"  encrypt+decrypt   {mb / min(both):8.0f} MB/s  (one core does both)")


if __name__ == "__main__":
    main()
