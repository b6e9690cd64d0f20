"""Typed user errors, and the one description of every error a user's input can cause.

Library code raises typed errors whose message starts with the input at fault and says what is
wrong with it: :class:`ImageReadError` (an image file), :class:`OptionError` (a value such as a
threshold, a size or a device), :class:`ModelFileError` (an ``.onnx`` file that cannot be parsed or
run), and beside them :class:`atssdet.convert.CheckpointError` and
:class:`atssdet.data.coco_records.DatasetError`. All of them are ``ValueError`` subclasses.

:func:`describe_user_error` turns an exception into the line that ``atssdet CMD: error: LINE``
prints (the CLI boundary, :func:`atssdet.cli.main`), or None for a genuine bug. Besides the typed
errors it knows what a user's input makes other libraries raise: OS errors (a path that is a file
where a folder is needed, permission denied, a symlink loop ...), OpenCV errors, ONNX parse and
shape errors, pycocotools assertions, ``MemoryError`` and ``RecursionError``. This module imports
nothing heavy (the CLI loads it before any command runs).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

# Where a traceback of a genuine bug should go (printed with it by the CLI boundary).
REPORT_URL = "https://github.com/atssdet/atssdet/issues"


class AtssdetError(ValueError):
    """A problem with the user's input; the message starts with the input and says what is wrong."""


class ImageReadError(AtssdetError):
    """An image that cannot be decoded; the message names the file and the reason."""


class OptionError(AtssdetError):
    """A value out of range (threshold, size, batch, device, ...); the message names it and the value."""


class ModelFileError(AtssdetError):
    """A model file (e.g. an exported ``.onnx``) that cannot be parsed, or whose graph does not
    accept the inputs atssdet gives it; the message names the file."""


_OS_PROBLEMS = {
    errno.ENOENT: "no such file or folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a folder, not a file",
    errno.ELOOP: "too many levels of symbolic links (a symlink loop)",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENXIO: "no such device or address (a FIFO or socket?)",
}


def _blocking_file(path: Path) -> Path | None:
    """The first ancestor of ``path`` that exists and is not a folder (why ENOTDIR was raised)."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def describe_os_error(exc: OSError) -> str:
    """``"PATH: problem"`` for an OS error (the destination of a rename, else its file name)."""
    name = exc.filename2 if exc.filename2 is not None else exc.filename
    if not isinstance(name, str | bytes | os.PathLike) or exc.errno is None:  # e.g. a file descriptor
        return str(exc)
    name = os.fsdecode(name)
    code = exc.errno
    if code == errno.ENOTDIR:
        blocker = _blocking_file(Path(name))
        problem = (
            f"{blocker} is a file, not a folder"
            if blocker is not None
            else "a part of the path is not a folder"
        )
    elif code == errno.EEXIST:
        exists_as_file = os.path.lexists(name) and not os.path.isdir(name)
        problem = "exists and is a file, not a folder" if exists_as_file else "already exists"
    else:
        problem = _OS_PROBLEMS.get(code, (exc.strerror or str(exc)).lower())
    return f"{name}: {problem}"


def is_memory_error(exc: BaseException) -> bool:
    """True for running out of memory: ``MemoryError``, torch's (CUDA) ``OutOfMemoryError``, a failed
    CPU allocation in torch, OpenCV's "insufficient memory"."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    if (isinstance(exc, RuntimeError) or is_onnx_error(exc)) and any(
        sign in text for sign in ("can't allocate memory", "out of memory", "Failed to allocate memory")
    ):
        return True
    return _is_cv2_error(exc) and ("Insufficient memory" in text or "Failed to allocate" in text)


def describe_memory_error(exc: BaseException) -> str:
    """``"out of memory (...)"`` with the first sentence of the library's message, if any."""
    detail = _first_sentence(str(exc))
    return "out of memory" + (f" ({detail})" if detail else "")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text)[:300]


def _is_cv2_error(exc: BaseException) -> bool:
    cv2 = sys.modules.get("cv2")
    return cv2 is not None and isinstance(exc, cv2.error)


def cv2_message(exc: BaseException) -> str:
    """OpenCV's message without its source-file prefix: ``(-215:Assertion failed) ... in function 'resize'``."""
    text = " ".join(str(exc).split())
    return re.sub(r"^OpenCV\([^)]*\)\s+\S+:\s*error:\s*", "", text)


def raised_in(exc: BaseException, package: str) -> bool:
    """True if the innermost frame of ``exc``'s traceback is code of ``package`` (e.g. "pycocotools")."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == package or module.startswith(package + ".")


# Modules whose exceptions mean "this ONNX file cannot be parsed / run with these inputs".
_ONNX_MODULES = ("onnx", "onnxruntime", "google.protobuf")


def is_onnx_error(exc: BaseException) -> bool:
    """An exception of onnx, onnxruntime or protobuf (parse errors, invalid graphs, shape mismatches)."""
    module = type(exc).__module__ or ""
    return any(module == m or module.startswith(m + ".") for m in _ONNX_MODULES)


def torch_load_problem(exc: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, without its advice to load with
    ``weights_only=False`` (which would run the file's code): the refused global, else its first sentence."""
    text = str(exc)
    match = re.search(r"unsupported GLOBAL (\S+)", text)
    if match:
        return f"refers to the Python object {match.group(1)}, which a weights-only load refuses"
    sentence = _first_sentence(text.replace("PytorchStreamReader failed reading zip archive: ", ""))
    return f"{type(exc).__name__}: {sentence}" if sentence else type(exc).__name__


def describe_user_error(exc: BaseException) -> str | None:
    """The message for an error the user's input caused (``atssdet CMD: error: <message>``), or None
    when ``exc`` is a bug in atssdet (the boundary then prints the traceback and asks for a report)."""
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if is_memory_error(exc):
        return describe_memory_error(exc) + "; try a smaller --batch-size, image size or input"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read (RecursionError); check the JSON or options given"
    if _is_cv2_error(exc):
        return f"OpenCV cannot process the input: {cv2_message(exc)}"
    if is_onnx_error(exc):
        return f"ONNX: {_first_sentence(str(exc)) or type(exc).__name__}"
    if raised_in(exc, "pycocotools"):
        return f"pycocotools refused the data: {type(exc).__name__}: {_first_sentence(str(exc))}"
    if isinstance(exc, ValueError):  # the typed errors, and plain ValueErrors that name their input
        return str(exc)
    return None
