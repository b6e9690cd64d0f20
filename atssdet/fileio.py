"""Atomic file writes: a temp file in the destination folder, renamed into place only when complete.

A reader (or a later run) therefore sees either the old file or the whole new one, never a
half-written file, even if the process is killed mid-write. Every writer in atssdet goes through
:func:`atomic_path` (or :func:`atomic_link`).

Written-by marks: a writer may pass ``mark="predict"`` (the command's name); the file then carries
that name with its size and modification time, so that :func:`written_by` can later tell a file
atssdet wrote from one the user put there (or edited since). The mark is an extended attribute
(``user.atssdet.written-by``), set on the temp file before the rename, so it is part of the file
and the folder listing stays as it was; where the file system has no user extended attributes
(macOS, FAT, older tmpfs) it goes into a small ``.atssdet-outputs.json`` in the folder instead.
:mod:`atssdet.guard` decides with it what a command may replace. :func:`hold_lock` is the lock
file of a training folder (:mod:`atssdet.training.ownership`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

_UMASK = os.umask(0)
os.umask(_UMASK)

MARK_ATTRIBUTE = "user.atssdet.written-by"
MARKS_FILE = ".atssdet-outputs.json"  # the marks of a folder whose file system has no extended attributes
# mkstemp's names: ``.NAME.`` + 8 characters of ``[a-z0-9_]`` + the suffix; atomic_link's: ``.NAME.PID.tmp``.
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:[a-z0-9_]{8}|\d+)(?P<suffix>\.[A-Za-z0-9]+)$")


@contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, suffix: str = ".tmp", sync_dir: bool = False, mark: str | None = None
) -> Iterator[Path]:
    """Yield a temp path beside ``path`` to write to; on success it is fsynced, given the usual
    permissions (``0o666 & ~umask``; ``mkstemp`` makes 0600) and renamed to ``path``; on any error
    (or interrupt) it is deleted and ``path`` is left as it was. Parent folders are created.

    The temp file is named ``.NAME.XXXXXXXX<suffix>`` (so ``.*.tmp`` finds those a killed process
    left). ``suffix`` lets libraries that choose a format by extension (cv2, matplotlib) see the real
    one. ``sync_dir`` also fsyncs the folder after the rename, so that the new name itself survives a
    power loss (training checkpoints: a resume must find them). ``mark``: the written-by mark the
    file gets (see the module docstring).
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
        in_folder_file = mark is not None and not _set_mark_attribute(tmp, mark)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if in_folder_file:
        _record_in_marks_file(path, str(mark))
    if sync_dir:
        fsync_dir(path.parent)


def temp_target(path: str | os.PathLike[str]) -> str | None:
    """The file name whose temp file ``path`` is (``.NAME.XXXXXXXX.tmp`` -> ``NAME``), else None.

    Only the names :func:`atomic_path` and :func:`atomic_link` make match; a clean-up uses it to
    remove what a killed writer left without touching the user's own ``.something.tmp`` files.
    """
    match = _TEMP_RE.match(Path(path).name)
    return match.group("name") if match else None


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


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, mark: str | None = None) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (``dst`` is the old file or the whole copy)."""
    with atomic_path(dst, mark=mark) as tmp:
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mark: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    with atomic_path(path, mark=mark) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mark: str | None = None) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mark=mark)


def atomic_write_json(
    path: str | os.PathLike[str], obj: Any, *, indent: int | None = None, mark: str | None = None
) -> Path:
    """Write ``obj`` as JSON (with a final newline when indented) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent)
    return atomic_write_text(path, text + "\n" if indent is not None else text, mark=mark)


# --------------------------------------------------------------------------- append-only streams


def open_stream(path: str | os.PathLike[str], *, mark: str) -> BinaryIO:
    """Open the line stream ``path`` for appending (created if missing), marked as ``mark``'s.

    A stream is the one kind of output that is not renamed into place: a job writes a line per
    finished item and flushes it, so that a job killed part-way leaves every finished line (the
    resume of ``atssdet predict``). A partial last line a killed writer left is cut off here first.
    The written-by mark is a *stream* mark: :func:`written_by` still names ``mark`` when the file has
    grown since (it is appended to by design), never when it shrank. Flushing is the caller's; lines
    reach the OS at each flush (they survive the process, not a power loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        os.ftruncate(fd, _complete_lines_end(fd))
    except BaseException:
        os.close(fd)
        raise
    stream = os.fdopen(fd, "ab")
    _mark_stream(path, mark)
    return stream


def close_stream(stream: BinaryIO, path: str | os.PathLike[str], *, mark: str) -> None:
    """Flush and close a stream of :func:`open_stream`, marking it at its final size."""
    stream.flush()
    stream.close()
    _mark_stream(Path(path), mark)


def _complete_lines_end(fd: int, chunk: int = 1 << 16) -> int:
    """The byte offset just after the last newline of the file ``fd`` (0 when it has none)."""
    end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        end = start
    return 0


def _mark_stream(path: Path, command: str) -> None:
    value = {**_mark_value(path, command), "stream": True}
    try:
        os.setxattr(path, MARK_ATTRIBUTE, json.dumps(value).encode())
    except (AttributeError, OSError):
        files = _read_marks_file(path.parent)
        files[path.name] = value
        doc = {"format": "atssdet-outputs", "files": files}
        atomic_write_text(path.parent / MARKS_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- written-by marks


def mark_written(path: str | os.PathLike[str], command: str) -> Path:
    """Mark the complete file ``path`` as written by ``command`` (for writers that cannot pass ``mark``)."""
    path = Path(path)
    if not _set_mark_attribute(path, command):
        _record_in_marks_file(path, command)
    return path


def written_by(path: str | os.PathLike[str]) -> str | None:
    """The command whose mark ``path`` carries, or None: no mark, or the file changed since (its size
    or modification time differs from the mark's), or no such file."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    record: Any = None
    try:
        record = json.loads(os.getxattr(path, MARK_ATTRIBUTE))
    except (AttributeError, OSError, ValueError):  # no xattr support, no mark, or a garbled one
        record = _read_marks_file(path.parent).get(path.name)
    if not isinstance(record, dict) or not isinstance(record.get("command"), str):
        return None
    if record.get("stream") is True and isinstance(record.get("size"), int):
        return str(record["command"]) if st.st_size >= record["size"] else None  # appended since
    if record.get("size") != st.st_size or record.get("mtime_ns") != st.st_mtime_ns:
        return None
    return str(record["command"])


def _mark_value(path: Path, command: str) -> dict[str, Any]:
    st = path.stat()
    return {"command": command, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _set_mark_attribute(path: Path, command: str) -> bool:
    """Set the mark as an extended attribute; False where the file system (or OS) has none."""
    try:
        os.setxattr(path, MARK_ATTRIBUTE, json.dumps(_mark_value(path, command)).encode())
    except (AttributeError, OSError):
        return False
    return True


def _read_marks_file(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MARKS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _record_in_marks_file(path: Path, command: str) -> None:
    """Add ``path``'s mark to its folder's marks file (read, merge, write atomically)."""
    files = _read_marks_file(path.parent)
    files[path.name] = _mark_value(path, command)
    doc = {"format": "atssdet-outputs", "files": files}
    atomic_write_text(path.parent / MARKS_FILE, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- lock files


class HeldLock:
    """An exclusive ``flock`` on a lock file, held until :meth:`release` or the process ends (the
    kernel drops it when the process dies, even by SIGKILL)."""

    def __init__(self, path: Path, fd: int, *, locked: bool = True) -> None:
        self.path, self._fd = path, fd
        self.locked = locked  # False where the file system (or OS) has no flock: nothing is excluded

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1


def hold_lock(path: str | os.PathLike[str], info: dict[str, Any]) -> HeldLock | None:
    """Take the exclusive lock of the file ``path`` (created if missing) without waiting and write
    ``info`` into it (as JSON, for :func:`read_lock_info`); None when another process holds it.

    The lock file is rewritten in place, never replaced: the lock belongs to its inode. Where
    ``fcntl`` does not exist (Windows) or the file system refuses locks (some network file systems)
    this succeeds with ``locked=False``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return HeldLock(path, fd, locked=False)
    locked = True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this file system
        locked = False
    except BaseException:
        os.close(fd)
        raise
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return HeldLock(path, fd, locked=locked)


def read_lock_info(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the holder of the lock file ``path`` wrote into it (None: nothing readable yet)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
