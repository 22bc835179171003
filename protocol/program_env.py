"""Process settings that BioPetals *programs* apply when they start; importing a library never does.

Native libraries read these variables once, when they load, so a program sets them at the top of
its entry module, before anything imports torch or cryptography:

    from biopetals.protocol.program_env import apply_program_environment

    apply_program_environment()

(then the program's other imports). A variable already set in the environment is kept, so a user
can override each one. The programs: node/cli.py, dht/cli.py, client/status.py, client/demo.py,
weights/cli.py, api/cli.py, api/demo.py, transport/keygen.py, conformance/cli.py, benchmarks/ and
examples/ (tests/test_layers.py lists them). See
spec/README.md §2 ("no environment variables set" by a library import).

- ``OPENSSL_ia32cap = ":~0x210000"``: no AVX-512 code paths in cryptography's bundled OpenSSL
  (bit 16 AVX512F, bit 21 AVX512IFMA of the CPUID leaf 7 word). On Intel server cores the 512-bit
  ChaCha20/Poly1305 kernels lower the core's clock for milliseconds after each use, slowing
  everything else the process and the kernel do between two small messages; an 8 KiB call
  measured ~10 us faster end to end without them (benchmarks/bench_transport.py), while the AVX2
  kernels still encrypt well above 1 GB/s.
- ``OMP_WAIT_POLICY = "PASSIVE"``: idle OpenMP threads (torch's) sleep at once instead of
  spinning. Spinning workers of a node that waits for the network steal the cores of the client
  and of the other nodes on the same machine; measured on a busy 2-core machine: 730 ms of CPU
  per SmolLM2 decode step instead of 48 ms, and 11 instead of 23 ms of client CPU per token
  (benchmarks/bench_client.py).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["PROGRAM_ENVIRONMENT", "apply_program_environment"]

PROGRAM_ENVIRONMENT: dict[str, str] = {
    "OPENSSL_ia32cap": ":~0x210000",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def apply_program_environment(environ: MutableMapping[str, str] | None = None) -> None:
    """Set every variable of ``PROGRAM_ENVIRONMENT`` that ``environ`` (default ``os.environ``) lacks."""
    target = os.environ if environ is None else environ
    for name, value in PROGRAM_ENVIRONMENT.items():
        target.setdefault(name, value)
