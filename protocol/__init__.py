"""Sans-IO protocol core: messages, codecs, framing, handshake. No sockets, no asyncio, no clock."""

import os

# Before cryptography's bundled OpenSSL loads (it reads this once): no AVX-512 code paths
# (bit 16 AVX512F, bit 21 AVX512IFMA of the CPUID leaf 7 word). On Intel server cores the
# 512-bit ChaCha20/Poly1305 kernels lower the core's clock for milliseconds after each use,
# slowing everything else the process and the kernel do between two small messages; an 8 KiB
# call measured ~10 us faster end to end without them (benchmarks/bench_transport.py), while
# the AVX2 kernels still encrypt well above 1 GB/s. Set OPENSSL_ia32cap yourself to override.
os.environ.setdefault("OPENSSL_ia32cap", ":~0x210000")
