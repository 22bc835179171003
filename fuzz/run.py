"""Run one fuzz target with atheris (libFuzzer), seeded from spec/vectors.

    python fuzz/run.py --list
    python fuzz/run.py TARGET [--corpus DIR] [libFuzzer args, e.g. -max_total_time=180 -jobs=1]

Targets are discovered from every ``fuzz/targets_*.py`` module's ``TARGETS`` dict:
``{"name": (callable(data: bytes) -> None, ["<vector file>.json", ...])}``. The hex of
every valid and invalid vector in the named files seeds the corpus. The invariant: a
target returns or raises ``RemoteProtocolError``; anything else is a crash, which
libFuzzer saves as ``crash-<sha1>`` in the working directory. See fuzz/README.md.

``discover_targets`` and ``seed_inputs`` are also used by tests/test_fuzz_bounded.py.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

FUZZ_DIR = Path(__file__).resolve().parent
VECTORS_DIR = FUZZ_DIR.parent / "spec" / "vectors"

Target = tuple[Callable[[bytes], None], list[str]]


def target_modules() -> list[Path]:
    return sorted(FUZZ_DIR.glob("targets_*.py"))


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"biopetals_fuzz_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def discover_targets() -> dict[str, Target]:
    """Every target of every fuzz/targets_*.py, by name (names must be unique)."""
    targets: dict[str, Target] = {}
    for path in target_modules():
        for name, target in load_module(path).TARGETS.items():
            if name in targets:
                raise SystemExit(f"fuzz target {name!r} defined twice (second time in {path.name})")
            targets[name] = target
    return targets


def seed_inputs(vector_files: list[str]) -> list[bytes]:
    """The bytes of every vector (valid, accepted and invalid) in the named spec/vectors files."""
    seeds = []
    for file_name in vector_files:
        doc = json.loads((VECTORS_DIR / file_name).read_text())
        for vector in doc.get("valid", []) + doc.get("accepted", []) + doc.get("invalid", []):
            if "hex" in vector:
                seeds.append(bytes.fromhex(vector["hex"]))
    return seeds


def write_seeds(corpus: Path, seeds: list[bytes]) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run a BioPetals fuzz target with atheris.", add_help=True)
    parser.add_argument("target", nargs="?", help="target name (see --list)")
    parser.add_argument("--list", action="store_true", help="list the targets and their seed files")
    parser.add_argument("--corpus", type=Path, help="corpus directory (default: a per-target temp directory)")
    args, fuzzer_args = parser.parse_known_args()

    if args.list or not args.target:
        for name, (_, files) in sorted(discover_targets().items()):
            print(f"{name:32} seeds: {', '.join(files) or '-'}")
        return

    import atheris  # only the runner needs it; the bounded tests do not

    # Instrument our modules (and the targets) for coverage; they must be imported here first.
    with atheris.instrument_imports(include=["biopetals"]):
        from biopetals.protocol.errors import RemoteProtocolError

        targets = discover_targets()
    if args.target not in targets:
        raise SystemExit(f"unknown target {args.target!r}; try --list")
    function, files = targets[args.target]

    inputs = [a for a in fuzzer_args if not a.startswith("-")]
    if inputs:  # files to reproduce (or corpus dirs) given explicitly: run exactly those
        corpus_args = []
    else:
        corpus = args.corpus or Path(tempfile.gettempdir()) / "biopetals-fuzz" / args.target
        write_seeds(corpus, seed_inputs(files))
        corpus_args = [str(corpus)]
        print(f"fuzzing {args.target} with corpus {corpus}", file=sys.stderr)

    def test_one_input(data: bytes) -> None:
        try:
            function(data)
        except RemoteProtocolError:
            pass  # the expected outcome for bad input

    atheris.Setup([sys.argv[0], *fuzzer_args, *corpus_args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
