"""What an environment variable holds at the moment a library is first imported, in a fresh
interpreter: for settings that native libraries read once, when they load (OpenMP, OpenSSL)."""

from __future__ import annotations

import os
import subprocess
import sys

_PROBE = """
import os, sys
seen = []
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {library!r} and not seen:
            seen.append(os.environ.get({variable!r}))
        return None
sys.meta_path.insert(0, Hook())
import {module}
print(seen[0] if seen else "not imported")
"""


def env_when_imported(module: str, library: str, variable: str, value: str | None = None) -> str:
    """``variable`` (started unset, or as ``value``) when importing ``module`` first imports
    ``library``; "not imported" if it never does."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    probe = _PROBE.format(library=library, variable=variable, module=module)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]
