"""Identity and swarm key files on a real filesystem (transport/keyfiles.py)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from biopetals.protocol.identity import Identity
from biopetals.protocol.swarm_key import SwarmKey
from biopetals.transport.keyfiles import (
    KeyFileError,
    KeyFileExistsError,
    KeyFileNotFoundError,
    load_identity,
    load_or_create_identity,
    load_swarm_key,
    write_identity,
    write_swarm_key,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")

# libp2p/specs peer-ids.md test vector and its peer id (see tests/test_identity.py).
SPEC_PRIVATE_PROTO = bytes.fromhex(
    "080112407e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d"
    "1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e"
)
SPEC_PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@posix_only
def test_identity_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = load_or_create_identity(path)
    assert _mode(path) == 0o600
    assert path.read_bytes() == first.to_private_key_proto()
    assert len(path.read_bytes()) == 68
    again = load_or_create_identity(path)
    assert again == first and again.peer_id == first.peer_id
    assert load_identity(path) == first
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]


@posix_only
def test_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_identity(tmp_path / "a.key")
        write_swarm_key(tmp_path / "s.key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.key") == 0o600
    assert _mode(tmp_path / "s.key") == 0o600


def test_libp2p_key_file_loads_with_its_peer_id(tmp_path: Path) -> None:
    path = _write(tmp_path / "libp2p.key", SPEC_PRIVATE_PROTO)
    assert str(load_identity(path).peer_id) == SPEC_PEER_ID


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "node.key"
    identity = load_or_create_identity(path)
    assert load_identity(path) == identity


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "file is empty"),
        (SPEC_PRIVATE_PROTO[:-1], "not a libp2p Ed25519 private key file (67 bytes)"),
        (SPEC_PRIVATE_PROTO + b"\n", "trailing bytes"),
        (b"\x08\x00" + SPEC_PRIVATE_PROTO[2:], "key type RSA is not supported"),
        (SPEC_PRIVATE_PROTO[:-1] + b"\x00", "does not match the private key"),
        (SwarmKey(bytes(32)).encode(), "this is a swarm key file"),
        (b"x" * 5000, "too large"),
    ],
)
def test_malformed_identity_file_error_names_file(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = _write(tmp_path / "bad.key", data)
    with pytest.raises(KeyFileError) as exc:
        load_identity(path)
    assert str(path) in str(exc.value)
    assert fragment in str(exc.value)
    # load_or_create never replaces a broken file: the operator must look at it.
    with pytest.raises(KeyFileError):
        load_or_create_identity(path)
    assert path.read_bytes() == data


def test_missing_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileNotFoundError, match="does not exist") as exc:
        load_identity(tmp_path / "nope.key")
    assert exc.value.path == tmp_path / "nope.key"
    with pytest.raises(KeyFileNotFoundError):
        load_swarm_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_swarm_key(tmp_path)


@posix_only
def test_dangling_symlink_is_reported_not_replaced(tmp_path: Path) -> None:
    link = tmp_path / "node.key"
    link.symlink_to(tmp_path / "gone.key")
    with pytest.raises(KeyFileError, match="symbolic link to a missing file"):
        load_or_create_identity(link)
    assert not (tmp_path / "gone.key").exists()


@posix_only
def test_symlinked_key_file_loads(tmp_path: Path) -> None:
    # Secret mounts (e.g. Kubernetes) present key files through symlinks.
    key = write_swarm_key(tmp_path / "real.key")
    (tmp_path / "lab.key").symlink_to(tmp_path / "real.key")
    assert load_swarm_key(tmp_path / "lab.key") == key


@posix_only
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644, 0o666])
def test_too_open_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    write_identity(path, Identity.generate())
    path.chmod(mode)
    with pytest.raises(KeyFileError, match=f"permissions {mode:04o} are too open") as exc:
        load_identity(path)
    assert "chmod 600" in str(exc.value)
    assert load_identity(path, check_permissions=False).peer_id  # explicit opt-out works
    write_swarm_key(tmp_path / "s.key").key
    (tmp_path / "s.key").chmod(mode)
    with pytest.raises(KeyFileError, match="too open"):
        load_swarm_key(tmp_path / "s.key")


@posix_only
def test_owner_read_only_is_fine(tmp_path: Path) -> None:
    key = write_swarm_key(tmp_path / "s.key")
    (tmp_path / "s.key").chmod(0o400)
    assert load_swarm_key(tmp_path / "s.key") == key


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.key", SwarmKey.generate().encode(), 0o000)
    with pytest.raises(KeyFileError, match="cannot open"):
        load_swarm_key(path)


def test_swarm_key_write_load_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "lab.key"
    key = write_swarm_key(path)
    assert load_swarm_key(path) == key
    with pytest.raises(KeyFileExistsError, match="refusing to overwrite"):
        write_swarm_key(path)
    assert load_swarm_key(path) == key
    other = write_swarm_key(path, overwrite=True)
    assert other != key and load_swarm_key(path) == other
    fixed = write_swarm_key(tmp_path / "fixed.key", SwarmKey(bytes(range(32))))
    assert (tmp_path / "fixed.key").read_bytes() == fixed.encode()


def test_go_libp2p_style_swarm_key_file_loads(tmp_path: Path) -> None:
    # As written by the usual `ipfs-swarm-key-gen` tool (upper-case hex is accepted too).
    key = bytes(range(32))
    path = _write(tmp_path / "swarm.key", b"/key/swarm/psk/1.0.0/\n/base16/\n" + key.hex().upper().encode() + b"\n")
    assert load_swarm_key(path).key == key


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"/key/swarm/psk/1.0.0/\n/base16/\n" + b"ab" * 31 + b"\n", "exactly 64 hex digits, got 62"),
        (b"/base16/\n" + b"ab" * 32 + b"\n", "first line must be '/key/swarm/psk/1.0.0/'"),
        (b"/key/swarm/psk/1.0.0/\n/hex/\n" + b"ab" * 32 + b"\n", "second line must name the encoding"),
        (SPEC_PRIVATE_PROTO, "first line"),
    ],
)
def test_malformed_swarm_key_file_error_names_file(tmp_path: Path, data: bytes, fragment: str) -> None:
    path = _write(tmp_path / "lab.key", data)
    with pytest.raises(KeyFileError) as exc:
        load_swarm_key(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: not a valid swarm key file:")
    assert fragment in message


def test_write_identity_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first = Identity.generate()
    write_identity(path, first)
    with pytest.raises(KeyFileExistsError):
        write_identity(path, Identity.generate())
    assert load_identity(path) == first
    second = Identity.generate()
    write_identity(path, second, overwrite=True)
    assert load_identity(path) == second


def test_concurrent_first_use_agrees_on_one_identity(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    results: list[Identity] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(load_or_create_identity(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert len({r.peer_id for r in results}) == 1
    assert load_identity(path) == results[0]
