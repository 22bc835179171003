"""``biopetals-keygen`` run as a real subprocess (transport/keygen.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from biopetals.protocol.identity import PeerId
from biopetals.transport.keyfiles import load_identity, load_swarm_key

_SCRIPT = Path(sys.executable).parent / "biopetals-keygen"


def keygen(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "biopetals.transport.keygen", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_swarm_writes_0600_key_and_refuses_overwrite(tmp_path: Path) -> None:
    result = keygen("swarm", "lab.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    key = load_swarm_key(tmp_path / "lab.key")
    assert key.fingerprint in result.stderr
    assert key.key.hex() not in result.stdout + result.stderr  # the secret is never printed
    if os.name == "posix":
        assert _mode(tmp_path / "lab.key") == 0o600
    again = keygen("swarm", "lab.key", cwd=tmp_path)
    assert again.returncode == 1
    assert "lab.key: already exists" in again.stderr and "--force" in again.stderr
    assert load_swarm_key(tmp_path / "lab.key") == key
    forced = keygen("swarm", "lab.key", "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert load_swarm_key(tmp_path / "lab.key") != key


def test_identity_prints_peer_id_and_is_idempotent(tmp_path: Path) -> None:
    result = keygen("identity", "node.key", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.startswith("12D3KooW")
    assert PeerId.from_base58(printed) == load_identity(tmp_path / "node.key").peer_id
    if os.name == "posix":
        assert _mode(tmp_path / "node.key") == 0o600
    before = (tmp_path / "node.key").read_bytes()
    again = keygen("identity", "node.key", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == printed
    assert "already exists" in again.stderr
    assert (tmp_path / "node.key").read_bytes() == before
    forced = keygen("identity", "node.key", "--force", cwd=tmp_path)
    assert forced.returncode == 0
    assert forced.stdout.strip() != printed
    assert PeerId.from_base58(forced.stdout.strip()) == load_identity(tmp_path / "node.key").peer_id


def test_identity_on_malformed_file_names_it_and_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "node.key").write_bytes(b"garbage")
    (tmp_path / "node.key").chmod(0o600)
    result = keygen("identity", "node.key", cwd=tmp_path)
    assert result.returncode == 1
    assert "node.key: not a libp2p Ed25519 private key file" in result.stderr
    assert result.stdout == ""
    assert (tmp_path / "node.key").read_bytes() == b"garbage"


def test_identity_given_a_swarm_key_says_so(tmp_path: Path) -> None:
    assert keygen("swarm", "lab.key", cwd=tmp_path).returncode == 0
    result = keygen("identity", "lab.key", cwd=tmp_path)
    assert result.returncode == 1
    assert "lab.key: this is a swarm key file" in result.stderr


def test_help_and_usage_errors(tmp_path: Path) -> None:
    top = keygen("--help", cwd=tmp_path)
    assert top.returncode == 0
    assert "swarm" in top.stdout and "identity" in top.stdout and "0600" in top.stdout
    for sub in ("swarm", "identity"):
        sub_help = keygen(sub, "--help", cwd=tmp_path)
        assert sub_help.returncode == 0 and "--force" in sub_help.stdout
    assert keygen(cwd=tmp_path).returncode == 2
    assert keygen("rsa", "x.key", cwd=tmp_path).returncode == 2
    assert keygen("swarm", cwd=tmp_path).returncode == 2


@pytest.mark.skipif(not _SCRIPT.exists(), reason="console script not installed in this environment")
def test_installed_console_script(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(_SCRIPT), "identity", "n.key"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert PeerId.from_base58(result.stdout.strip()) == load_identity(tmp_path / "n.key").peer_id
