"""Every BioPetals process turns off the AVX-512 code paths of cryptography's bundled OpenSSL.

Why (protocol/__init__.py): the 512-bit ChaCha20/Poly1305 kernels lower an Intel core's clock
for milliseconds after each use, which slowed everything between two small messages; an
8 KiB call measured ~10 us faster end to end without them (benchmarks/bench_transport.py).
OpenSSL reads OPENSSL_ia32cap once, when cryptography's Rust module loads, so the variable
must be set before that import - checked here in a fresh interpreter per entry point.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Records OPENSSL_ia32cap at the moment cryptography's Rust extension (with OpenSSL) is imported.
_PROBE = """
import os, sys
seen = []
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "cryptography.hazmat.bindings._rust" and not seen:
            seen.append(os.environ.get("OPENSSL_ia32cap"))
        return None
sys.meta_path.insert(0, Hook())
import {module}
print(seen[0] if seen else "cryptography not imported")
"""


def _caps_when_openssl_loads(module: str, env_caps: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if env_caps is not None:
        env["OPENSSL_ia32cap"] = env_caps
    out = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("module", ["biopetals.node.cli", "biopetals.client", "biopetals.dht.cli", "biopetals.transport.keygen"])
def test_avx512_is_off_before_openssl_loads(module: str) -> None:
    assert _caps_when_openssl_loads(module) == ":~0x210000"


def test_an_explicit_setting_is_kept() -> None:
    assert _caps_when_openssl_loads("biopetals.transport.host", "~0x0") == "~0x0"
