"""``python tests/faulty_cli.py FAULT=A:B CLI-ARGS...``: ``atssdet CLI-ARGS`` with one fault injected (tests only).

The library reads no test switches; this script monkeypatches it, then calls :func:`atssdet.cli.main`.
It runs under ``torchrun`` too (needs the repository root on ``PYTHONPATH``). FAULT is one of:

* ``stall_rank=R:I``: rank R stops responding (sleeps an hour) at 0-based iteration I;
* ``kill_rank=R:I``: rank R SIGKILLs itself at iteration I;
* ``slow_checkpoint=I:S``: the checkpoint of iteration I waits S seconds between writing its temp file
  and renaming it, so that a test can kill the process mid-write.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import atssdet.training.checkpoint as checkpoint_mod
import atssdet.training.loop as loop_mod
from atssdet import distributed
from atssdet.cli import main


def _at_step(rank: int, iteration: int, fault: Any) -> None:
    """Wrap the loop's ``train_step``: ``fault()`` runs on ``rank`` before its step ``iteration``."""
    real = loop_mod.train_step

    def step(*args: Any, **kwargs: Any) -> Any:
        if distributed.get_rank() == rank and kwargs["iteration"] == iteration:
            fault()
        return real(*args, **kwargs)

    loop_mod.train_step = step


def _slow_checkpoint(iteration: int, seconds: float) -> None:
    """Wrap the checkpoint module's ``atomic_path``: sleep after the body wrote the temp file."""
    real = checkpoint_mod.atomic_path
    name = checkpoint_mod.checkpoint_path(".", iteration).name

    @contextmanager
    def slow(path: Any, **kwargs: Any) -> Iterator[Path]:
        with real(path, **kwargs) as tmp:
            yield tmp
            if Path(path).name == name:
                time.sleep(seconds)

    checkpoint_mod.atomic_path = slow


def inject(spec: str) -> None:
    kind, _, args = spec.partition("=")
    a, b = args.split(":")
    if kind == "stall_rank":
        _at_step(int(a), int(b), lambda: time.sleep(3600))
    elif kind == "kill_rank":
        _at_step(int(a), int(b), lambda: os.kill(os.getpid(), signal.SIGKILL))
    elif kind == "slow_checkpoint":
        _slow_checkpoint(int(a), float(b))
    else:
        raise SystemExit(f"faulty_cli.py: unknown fault {spec!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    raise SystemExit(main(sys.argv[2:]))
