"""Every BioPetals process turns off the AVX-512 code paths of cryptography's bundled OpenSSL.

Why (protocol/program_env.py): the 512-bit ChaCha20/Poly1305 kernels lower an Intel core's clock
for milliseconds after each use, which slowed everything between two small messages; an
8 KiB call measured ~10 us faster end to end without them (benchmarks/bench_transport.py).
OpenSSL reads OPENSSL_ia32cap once, when cryptography's Rust module loads, so the variable
must be set before that import - checked here in a fresh interpreter per entry point. A library
import sets nothing (tests/test_layers.py): the programs apply it.
"""

from __future__ import annotations

import pytest

from support_env import env_when_imported

def _caps_when_openssl_loads(module: str, env_caps: str | None = None) -> str:
    """OPENSSL_ia32cap when ``module`` first imports cryptography's Rust extension (with OpenSSL)."""
    return env_when_imported(module, "cryptography.hazmat.bindings._rust", "OPENSSL_ia32cap", env_caps)


# The programs that load OpenSSL when imported (the others load it later, in main(), after the
# setting; tests/test_layers.py checks that every program applies it first).
@pytest.mark.parametrize("module", ["biopetals.node.cli", "biopetals.client.status", "biopetals.dht.cli",
                                    "biopetals.transport.keygen", "biopetals.conformance.cli", "biopetals.weights.cli"])
def test_avx512_is_off_before_openssl_loads(module: str) -> None:
    assert _caps_when_openssl_loads(module) == ":~0x210000"


def test_an_explicit_setting_is_kept() -> None:
    assert _caps_when_openssl_loads("biopetals.node.cli", "~0x0") == "~0x0"


def test_a_library_import_leaves_it_unset() -> None:
    assert _caps_when_openssl_loads("biopetals.transport.host") == "None"
