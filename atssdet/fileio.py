"""Atomic file writes: a temp file in the destination folder, renamed into place only when complete.

A reader (or a later run) therefore sees either the old file or the whole new one, never a
half-written file, even if the process is killed mid-write. Every writer in atssdet goes through
:func:`atomic_path` (or :func:`atomic_link`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, suffix: str = ".tmp", sync_dir: bool = False
) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; on success it is fsynced, given the usual
    permissions (``0o666 & ~umask``; ``mkstemp`` makes 0600) and renamed to ``path``; on any error
    (or interrupt) it is deleted and ``path`` is left as it was. Parent folders are created.

    The temp file is named ``.NAME.XXXXXXXX<suffix>`` (so ``.*.tmp`` finds those a killed process
    left). ``suffix`` lets libraries that choose a format by extension (cv2, matplotlib) see the real
    one. ``sync_dir`` also fsyncs the folder after the rename, so that the new name itself survives a
    power loss (training checkpoints: a resume must find them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder (makes renames in it durable); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (``dst`` is the old file or the whole copy)."""
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


def atomic_link(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, sync_dir: bool = False) -> Path:
    """Point ``dst`` at the file ``src`` atomically: ``dst`` names the old file or ``src``, never nothing.

    A hard link (a copy where the file system has none) at ``.DST.PID.tmp``, renamed onto ``dst``;
    ``src``'s permissions are left alone (``last.pt`` beside training checkpoints).
    """
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(dst.parent)
    return dst


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON (with a final newline when indented) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent)
    return atomic_write_text(path, text + "\n" if indent is not None else text)
