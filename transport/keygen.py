"""``biopetals-keygen``: create swarm keys and node identities.

See spec/transport.md §1.5 and §1.6. Exit status: 0 success, 1 a key
file problem (exists, malformed, unwritable; the message names the file), 2 usage.
"""

from __future__ import annotations

from biopetals.protocol.program_env import apply_program_environment

apply_program_environment()  # a program: OpenSSL and OpenMP settings before they load (protocol/program_env.py)

import argparse
import sys

from biopetals.protocol.identity import Identity

from .keyfiles import (
    KeyFileError,
    KeyFileExistsError,
    KeyFileNotFoundError,
    load_identity,
    write_identity,
    write_swarm_key,
)

_DESCRIPTION = """\
Create the key files a BioPetals swarm needs.

  biopetals-keygen swarm lab.key       new private-swarm key (IPFS swarm.key format)
  biopetals-keygen identity node.key   new node identity; prints its peer id

Every file is created with permissions 0600 (owner only); BioPetals refuses to load a
key file that other users can read. Copy the swarm key to every machine of the swarm
(keep it 0600); each node has its own identity file.
"""

_SWARM_HELP = """\
Write a new random 32-byte swarm key in the IPFS swarm.key format:

  /key/swarm/psk/1.0.0/
  /base16/
  <64 hex digits>

The same file works with go-libp2p / kubo private networks. Only peers holding this
key can connect to the swarm. Prints the key's fingerprint (safe to share; the key
itself is secret). Refuses to overwrite an existing file unless --force is given.
"""

_IDENTITY_HELP = """\
Write a new Ed25519 node identity: the raw bytes of a libp2p PrivateKey protobuf (the
format of rust-libp2p's Keypair::to_protobuf_encoding and go-libp2p's
crypto.MarshalPrivateKey). Prints the peer id (12D3KooW...) on standard output.

If the file already exists it is left untouched and its peer id is printed, so the
command is safe to run repeatedly; --force replaces it with a NEW identity (the node
then has a new peer id).
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="biopetals-keygen",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{swarm,identity}")

    swarm = commands.add_parser(
        "swarm",
        help="write a new swarm key file",
        description=_SWARM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    swarm.add_argument("path", help="file to create, for example lab.key")
    swarm.add_argument("--force", action="store_true", help="overwrite PATH if it exists (old key is lost)")

    identity = commands.add_parser(
        "identity",
        help="write a new node identity and print its peer id",
        description=_IDENTITY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    identity.add_argument("path", help="file to create, for example node.key")
    identity.add_argument(
        "--force", action="store_true", help="replace an existing identity with a new one (new peer id)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "swarm":
            key = write_swarm_key(args.path, overwrite=args.force)
            print(f"wrote swarm key {args.path} (fingerprint {key.fingerprint})", file=sys.stderr)
            return 0
        # identity
        if not args.force:
            try:
                existing = load_identity(args.path)
            except KeyFileNotFoundError:
                pass
            else:
                print(f"{args.path} already exists; not overwriting (use --force)", file=sys.stderr)
                print(existing.peer_id)
                return 0
        new = Identity.generate()
        write_identity(args.path, new, overwrite=args.force)
        print(f"wrote identity {args.path}", file=sys.stderr)
        print(new.peer_id)
        return 0
    except KeyFileExistsError as exc:
        print(f"biopetals-keygen: error: {exc} (use --force to replace it; the old key is lost)", file=sys.stderr)
        return 1
    except KeyFileError as exc:
        print(f"biopetals-keygen: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
