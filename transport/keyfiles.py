"""Reading and writing identity and swarm key files (the only file I/O for keys).

See spec/transport.md §1.5 (rule K5) and §1.6 for the formats:

- identity file: the raw bytes of a libp2p ``PrivateKey`` protobuf, Ed25519 (68 bytes;
  the same bytes rust-libp2p's ``Keypair::to_protobuf_encoding`` and go-libp2p's
  ``crypto.MarshalPrivateKey`` produce);
- swarm key file: IPFS ``swarm.key`` text (``protocol/swarm_key.py``).

Permissions. Key files are created ``0600`` (owner read/write), atomically: the
bytes go to a private temporary file in the same directory, are fsynced, and are
then linked into place, so a crash never leaves a half-written key and two nodes
starting at once never both win. On *loading*, a key file that any group or other
user may read or write is refused, as OpenSSH refuses an unprotected private key:
a leaked identity lets anyone impersonate the node, a leaked swarm key opens the
private swarm. ``check_permissions=False`` turns the check off (for example for a
read-only secret mount whose mode cannot be changed).

Every failure raises ``KeyFileError``, whose message names the file and says what is
wrong with it.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from biopetals.protocol.errors import RemoteProtocolError
from biopetals.protocol.identity import Identity
from biopetals.protocol.swarm_key import MAX_SWARM_KEY_FILE_LEN, SWARM_KEY_HEADER, SwarmKey

__all__ = [
    "KeyFileError",
    "KeyFileExistsError",
    "KeyFileNotFoundError",
    "load_identity",
    "load_or_create_identity",
    "write_identity",
    "load_swarm_key",
    "write_swarm_key",
    "KEY_FILE_MODE",
]

KEY_FILE_MODE = 0o600
_KEY_DIR_MODE = 0o700  # for directories we create to hold a key file
_MAX_IDENTITY_FILE_LEN = 1024
_CHECK_MODES = os.name == "posix"


class KeyFileError(Exception):
    """A key file is missing, unreadable, malformed or too widely readable."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class KeyFileExistsError(KeyFileError):
    """Refused to overwrite an existing key file."""


class KeyFileNotFoundError(KeyFileError):
    """The key file does not exist."""


# --------------------------------------------------------------------------- identity


def load_identity(path: str | os.PathLike[str], *, check_permissions: bool = True) -> Identity:
    """Load an Ed25519 identity from a libp2p ``PrivateKey`` protobuf file."""
    data = _read_key_file(Path(path), _MAX_IDENTITY_FILE_LEN, check_permissions)
    return _decode_identity(Path(path), data)


def load_or_create_identity(path: str | os.PathLike[str], *, check_permissions: bool = True) -> Identity:
    """Load the identity at ``path``, or create one there (0600) if the file does not exist."""
    path = Path(path)
    try:
        data = _read_key_file(path, _MAX_IDENTITY_FILE_LEN, check_permissions, missing_ok=True)
    except FileNotFoundError:
        identity = Identity.generate()
        try:
            write_identity(path, identity)
            return identity
        except KeyFileExistsError:
            # Another process created it between our read and our write: use theirs.
            data = _read_key_file(path, _MAX_IDENTITY_FILE_LEN, check_permissions)
    return _decode_identity(path, data)


def write_identity(path: str | os.PathLike[str], identity: Identity, *, overwrite: bool = False) -> None:
    """Write ``identity`` as a libp2p ``PrivateKey`` protobuf file, mode 0600."""
    _write_key_file(Path(path), identity.to_private_key_proto(), overwrite)


def _decode_identity(path: Path, data: bytes) -> Identity:
    if data.startswith(SWARM_KEY_HEADER):
        raise KeyFileError(path, "this is a swarm key file, not an identity (private key) file")
    try:
        return Identity.from_private_key_proto(data)
    except RemoteProtocolError as exc:
        raise KeyFileError(
            path, f"not a libp2p Ed25519 private key file ({len(data)} bytes): {exc.message}"
        ) from None


# --------------------------------------------------------------------------- swarm key


def load_swarm_key(path: str | os.PathLike[str], *, check_permissions: bool = True) -> SwarmKey:
    """Load an IPFS ``swarm.key`` file."""
    path = Path(path)
    data = _read_key_file(path, MAX_SWARM_KEY_FILE_LEN, check_permissions)
    try:
        return SwarmKey.parse(data)
    except RemoteProtocolError as exc:
        raise KeyFileError(path, f"not a valid swarm key file: {exc.message}") from None


def write_swarm_key(
    path: str | os.PathLike[str], key: SwarmKey | None = None, *, overwrite: bool = False
) -> SwarmKey:
    """Write ``key`` (a new random key if None) as a swarm.key file, mode 0600; return it."""
    key = SwarmKey.generate() if key is None else key
    _write_key_file(Path(path), key.encode(), overwrite)
    return key


# --------------------------------------------------------------------------- files


def _read_key_file(path: Path, limit: int, check_permissions: bool, *, missing_ok: bool = False) -> bytes:
    """Read a small regular file, checking type, size and mode on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if path.is_symlink():
            raise KeyFileError(path, f"is a symbolic link to a missing file ({os.readlink(path)})") from None
        if missing_ok:
            raise
        raise KeyFileNotFoundError(path, "file does not exist") from None
    except IsADirectoryError:
        raise KeyFileError(path, "is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(path, f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise KeyFileError(path, "is a directory, not a key file")
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(path, "is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if check_permissions and _CHECK_MODES and mode & 0o077:
            raise KeyFileError(
                path,
                f"permissions {mode:04o} are too open: a key file must be accessible by its owner "
                f"only (run: chmod 600 '{path}')",
            )
        if info.st_size > limit:
            raise KeyFileError(path, f"is {info.st_size} bytes, too large to be a key file (limit {limit})")
        try:
            data = os.read(fd, limit + 1)
        except OSError as exc:
            raise KeyFileError(path, f"cannot read: {exc.strerror}") from None
        if len(data) > limit:
            raise KeyFileError(path, f"too large to be a key file (limit {limit} bytes)")
        if not data:
            raise KeyFileError(path, "file is empty")
        return data
    finally:
        os.close(fd)


def _write_key_file(path: Path, data: bytes, overwrite: bool) -> None:
    """Atomically create ``path`` with ``data`` and mode 0600.

    Without ``overwrite``, an existing file is never replaced (``os.link`` fails if
    the name exists, so two writers racing cannot both succeed).
    """
    if not overwrite and (path.exists() or path.is_symlink()):
        raise KeyFileExistsError(path, "already exists; refusing to overwrite a key file")
    parent = path.parent
    try:
        parent.mkdir(mode=_KEY_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(path, f"cannot create directory {parent}: {exc.strerror}") from None
    try:
        # mkstemp creates the file 0600 (never wider, whatever the umask).
        fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise KeyFileError(path, f"cannot write in {parent}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, KEY_FILE_MODE)  # exactly 0600, even under an odd umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
        _fsync_dir(parent)
    except OSError as exc:
        raise KeyFileError(path, f"cannot write: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileExistsError(path, "already exists; refusing to overwrite a key file") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # Filesystem without hard links: exclusive create instead (still never
        # overwrites, but a crash mid-write could leave a short file, which then
        # fails to load with a clear error).
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        except FileExistsError:
            raise KeyFileExistsError(path, "already exists; refusing to overwrite a key file") from None
        try:
            data = tmp.read_bytes()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the file itself is synced
    finally:
        os.close(fd)
