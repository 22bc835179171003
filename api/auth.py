"""Access control: where the server may listen, and API keys.

Rules (issue 13): the server binds 127.0.0.1 unless told otherwise; any address that is
not loopback needs an API-key file (``--api-keys FILE``: one key per line, ``#`` comments,
mode 0600 like every key file of BioPetals). With keys, every request except the static
page itself must carry ``Authorization: Bearer <key>`` (what OpenAI clients send); a wrong
or missing key gets 401 in OpenAI's error format and nothing else: no model name, no
swarm data. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import stat
from pathlib import Path

from biopetals.transport.keyfiles import KeyFileError

from .errors import APIError

__all__ = ["load_api_keys", "is_loopback", "check_bind", "check_key", "PUBLIC_PATHS"]

#: Paths served without a key: the page's own files, which hold no swarm data.
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)

MAX_KEYS_FILE = 1 << 20


def load_api_keys(path: str | os.PathLike) -> tuple[str, ...]:
    """Keys of ``path`` (one per line); refuses a file others may read, or one without keys."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as exc:
        raise KeyFileError(path, f"cannot read the API-key file: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(path, "is not a regular file")
    if os.name == "posix" and stat.S_IMODE(info.st_mode) & 0o077:
        raise KeyFileError(path, f"permissions {stat.S_IMODE(info.st_mode):04o} are too open: an API-key file "
                                 f"must be accessible by its owner only (run: chmod 600 '{path}')")
    if info.st_size > MAX_KEYS_FILE:
        raise KeyFileError(path, "too large for an API-key file")
    keys = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if len(line) < 16 or any(c.isspace() for c in line):
                raise KeyFileError(path, "every API key must be one word of at least 16 characters")
            keys.append(line)
    if not keys:
        raise KeyFileError(path, "holds no API key")
    return tuple(keys)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, keys: tuple[str, ...] | None) -> None:
    """Refuse to listen beyond loopback without API keys."""
    if not is_loopback(host) and not keys:
        raise ValueError(f"--host {host} is reachable from other machines: pass --api-keys FILE so that only "
                         "holders of a key can use the swarm (without keys, the server binds 127.0.0.1 only)")


def needs_key(path: str) -> bool:
    return path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES)


def check_key(authorization: str | None, keys: tuple[str, ...]) -> None:
    """``Authorization: Bearer <key>`` must name one of ``keys`` (401 otherwise)."""
    scheme, _, given = (authorization or "").partition(" ")
    given = given.strip()
    ok = False
    if scheme.lower() == "bearer" and given:
        for key in keys:  # no early exit: the time taken does not tell which key is close
            ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with a key of this "
                            "server's --api-keys file", "invalid_request_error", "invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
