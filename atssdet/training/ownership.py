"""Who owns a training folder: one run at a time, and a run touches only its own files.

:func:`claim_run_folder` is the first thing :func:`atssdet.training.train` does with ``out_dir``:

1. **The lock.** Rank 0 takes an exclusive ``flock`` on ``out_dir/.run.lock`` (only rank 0 under
   ``torchrun``) and writes its pid, host and start time into it. It holds the lock until ``train``
   returns or raises (:func:`releases_run_folders`); if the process dies, even by SIGKILL, the
   kernel drops it, so a crashed run needs no manual clean-up. A second training into the same
   folder is refused at once, naming the first (pid, host, start time).
2. **Another run's files.** A new run (no ``resume``) into a folder that holds checkpoints or final
   weights is refused, naming them, unless ``overwrite`` (then it becomes the folder's run and
   replaces same-named files; the old run's other files stay, ignored).
3. **Temp files.** Only atssdet's own temp names of the files training writes
   (:func:`atssdet.training.checkpoint.prepare_out_dir`) are removed, after the lock is held.

Every run has a run id (a uuid), kept in every checkpoint (``state["run_id"]``) and in the folder's
run record ``out_dir/run.json``, with the names of the run's checkpoints. ``--resume`` continues
the checkpoint's run (its id; a checkpoint written before run ids existed gets a new one);
``--resume auto`` and ``keep_checkpoints`` pruning consider only the run's own checkpoints
(:meth:`RunFolder.own_checkpoints`). A folder without a record (written before run ids) is
resumed as before: its newest loadable checkpoint.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from atssdet import distributed
from atssdet.errors import AtssdetError
from atssdet.fileio import HeldLock, atomic_write_json, hold_lock, read_lock_info
from atssdet.training.checkpoint import (
    FINAL_WEIGHTS_NAME,
    LAST_NAME,
    checkpoint_iteration,
    list_checkpoints,
    prepare_out_dir,
)

if TYPE_CHECKING:
    from atssdet.training.checkpoint import Resume

LOCK_NAME = ".run.lock"
RECORD_NAME = "run.json"
RECORD_FORMAT = "atssdet-train-run"

P = ParamSpec("P")
R = TypeVar("R")
_HELD: contextvars.ContextVar[list[RunFolder] | None] = contextvars.ContextVar(
    "atssdet_run_folders", default=None
)


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class RunFolderError(AtssdetError):
    """The training folder belongs to another run (or is in use); the message says which and what to do."""


@dataclass
class RunFolder:
    """A training folder as one run holds it (on ranks > 0 an empty stand-in: only rank 0 writes)."""

    out_dir: Path
    lock: HeldLock | None = None
    record: dict[str, Any] | None = None  # the folder's run record when the run started (None: none)
    run_id: str | None = None  # set by :meth:`begin`
    checkpoints: list[str] = field(default_factory=list)  # names of this run's checkpoints
    holder: dict[str, Any] = field(default_factory=_holder)  # pid, host, start time of this process

    def own_checkpoints(self) -> list[Path] | None:
        """This run's checkpoints that exist, newest first; None in a folder without a run record
        (before :meth:`begin`: the recorded run's; there every ``iter_*.pt`` counts)."""
        names = self.checkpoints if self.run_id is not None else (self.record or {}).get("checkpoints")
        if names is None:
            return None
        paths = [self.out_dir / n for n in dict.fromkeys(names) if (self.out_dir / n).is_file()]
        return sorted(paths, key=checkpoint_iteration, reverse=True)

    def not_ours(self, path: Path, state: dict[str, Any]) -> str | None:
        """Why the loaded checkpoint ``path`` belongs to another run than the folder's, or None."""
        want = self.run_id or (self.record or {}).get("run_id")
        got = state.get("run_id")
        if want is None or got is None or got == want:
            return None
        return f"{path}: belongs to another run (run id {got}, the folder's run is {want})"

    def begin(self, resumed: Resume | None, *, overwrite: bool) -> None:
        """Fix the run id (the resumed checkpoint's, else a new one) and write the run record (rank 0).

        A run that was to resume (``--resume auto``) but found none of the folder's checkpoints
        is a new run: refused, like one without ``--resume``, where another run's files are there.
        """
        error = None
        if distributed.is_main_process():
            try:
                self._begin(resumed, overwrite=overwrite)
            except RunFolderError as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise RunFolderError(error)

    def _begin(self, resumed: Resume | None, *, overwrite: bool) -> None:
        record = self.record or {}
        if resumed is None:
            if not overwrite:
                _refuse_other_runs(
                    self.out_dir, "--resume auto found no usable checkpoint of its run, and the folder "
                )
            self.run_id, self.checkpoints = uuid.uuid4().hex, []
        else:
            here = resumed.path.parent.resolve() == self.out_dir.resolve()
            saved_id = resumed.state.get("run_id")
            if saved_id is None and here and resumed.path.name in record.get("checkpoints", ()):
                saved_id = record.get("run_id")  # a legacy checkpoint this folder's run adopted
            self.run_id = str(saved_id or uuid.uuid4().hex)
            if not overwrite and record.get("run_id") not in (None, self.run_id):
                _refuse_other_runs(self.out_dir, f"{resumed.path} continues another run, but the folder ")
            if record.get("run_id") == self.run_id:
                self.checkpoints = list(record.get("checkpoints", []))
            elif self.record is None and here and saved_id is None:  # a folder from before run ids
                self.checkpoints = [p.name for p in list_checkpoints(self.out_dir)]
            else:
                self.checkpoints = [resumed.path.name] if here else []
        self._write_record()

    def add_checkpoint(self, path: Path) -> None:
        """Record ``path`` as this run's, before it is written (a crash then leaves at most a name
        whose file is missing or not the run's: :meth:`not_ours` tells)."""
        if self.run_id is not None and path.name not in self.checkpoints:
            self.checkpoints.append(path.name)
            self._write_record()

    def prune(self, keep: int, *, newest: Path) -> list[Path]:
        """Delete this run's checkpoints beyond the newest ``keep`` (never ``newest``, the one just
        written, nor another run's); returns what was deleted."""
        own = self.own_checkpoints() or []
        old = [p for p in own[max(1, keep) :] if p.name != newest.name]
        for path in old:
            path.unlink(missing_ok=True)
        if old:
            gone = {p.name for p in old}
            self.checkpoints = [n for n in self.checkpoints if n not in gone]
            self._write_record()
        return old

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _write_record(self) -> None:
        record = {
            "format": RECORD_FORMAT,
            "run_id": self.run_id,
            **self.holder,
            "checkpoints": self.checkpoints,
        }
        atomic_write_json(self.out_dir / RECORD_NAME, record, indent=1)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_run_folder(
    out_dir: str | os.PathLike[str], *, resume: str | os.PathLike[str] | None, overwrite: bool = False
) -> RunFolder:
    """Take ``out_dir`` for a training run (see the module docstring); :class:`RunFolderError` if
    another run holds it or (without ``resume`` or ``overwrite``) has files in it. Collective under
    ``torchrun``: rank 0 decides, every rank raises the same error."""
    out = Path(out_dir)
    folder, error = RunFolder(out), None
    if distributed.is_main_process():
        try:
            folder = _claim(out, resume=resume, overwrite=overwrite)
        except RunFolderError as exc:
            error = str(exc)
    error = distributed.broadcast_object(error)
    if error is not None:
        folder.release()
        raise RunFolderError(error)
    held = _HELD.get()
    if held is not None:
        held.append(folder)
    return folder


def releases_run_folders(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` holds the folders it claims (:func:`claim_run_folder`) until it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        token = _HELD.set([])
        try:
            return fn(*args, **kwargs)
        finally:
            for folder in _HELD.get() or []:
                folder.release()
            _HELD.reset(token)

    return wrapper


def read_run_record(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's run record (None: none, or not one of ours)."""
    try:
        record = json.loads((Path(out_dir) / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _claim(out: Path, *, resume: str | os.PathLike[str] | None, overwrite: bool) -> RunFolder:
    if out.exists() and not out.is_dir():
        raise RunFolderError(
            f"{out}: exists and is a file, not a folder; give --out a folder for the training run"
        )
    holder = _holder()
    lock = hold_lock(out / LOCK_NAME, holder)
    if lock is None:
        raise RunFolderError(f"{out}: {_busy_message(out / LOCK_NAME)}")
    if not lock.locked:
        print(
            f"atssdet train: warning: {out}: the file system refuses file locks; a second training into "
            "this folder would not be refused",
            file=sys.stderr,
        )
    try:
        if resume is None and not overwrite:
            _refuse_other_runs(out, "")
        prepare_out_dir(out, also=(RECORD_NAME,))
    except BaseException:
        lock.release()
        raise
    return RunFolder(out, lock=lock, record=read_run_record(out), holder=holder)


def _refuse_other_runs(out: Path, why: str) -> None:
    """Refuse a new run where checkpoints or final weights of another run are."""
    found = [p.name for p in reversed(list_checkpoints(out))]
    found += [n for n in (LAST_NAME, FINAL_WEIGHTS_NAME) if (out / n).is_file()]
    if found:
        raise RunFolderError(
            f"{out}: {why}holds another training run's files ({', '.join(found)}); continue that run "
            "with --resume auto, start a new run over it with --overwrite, or train into another --out"
        )


def _busy_message(lock: Path) -> str:
    info = None
    for _ in range(20):  # the holder writes its details right after it takes the lock
        if (info := read_lock_info(lock)) is not None:
            break
        time.sleep(0.05)
    if info is None:
        return f"another process holds the training lock {lock}; wait for it to finish or use another --out"
    return (
        f"another training run is using this folder: pid {info.get('pid')} on {info.get('host')}, "
        f"started {info.get('started')}; wait for it to finish (or stop it), or train into another --out"
    )
