"""Run the README's example block as a new user would: in a fresh clone, as written, several times.

    python tools/readme_examples.py [--runs 2] [--clone DIR]

The block is the ```bash fence that follows the line ``<!-- readme-examples -->`` in README.md. The
clone is made next to this checkout (so ``../shared`` resolves as in the checkout) from the committed
HEAD, with ``.venv`` linked to this checkout's virtual environment (the block activates it with
``. .venv/bin/activate``, as the README tells users to). Every run executes the whole block with
``bash -euo pipefail`` in the clone; the script exits 1 at the first run that fails. ``make
readme-examples`` calls it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-examples -->"


def example_block(readme: Path) -> str:
    """The shell text of the fenced block after :data:`MARKER`."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(MARKER)
    if start < 0:
        raise SystemExit(f"{readme}: no {MARKER} line")
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, start)
    if match is None:
        raise SystemExit(f"{readme}: no ```bash block after {MARKER}")
    return match.group(1)


def fresh_clone(dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    venv = REPO / ".venv"
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"{venv}: no virtual environment; run `make setup` first")
    (dest / ".venv").symlink_to(venv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="how many times to run the block (default 2)")
    parser.add_argument(
        "--clone", type=Path, default=REPO.parent / "atssdet-readme-examples", help="clone folder"
    )
    args = parser.parse_args()
    block = example_block(REPO / "README.md")
    fresh_clone(args.clone)
    for run in range(1, args.runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=args.clone)
        seconds = time.perf_counter() - start
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"readme examples, run {run} of {args.runs}: {status} in {seconds:.0f} s", flush=True)
        if proc.returncode != 0:
            return 1
    print(f"all {args.runs} runs of the README example block succeeded in the fresh clone {args.clone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
