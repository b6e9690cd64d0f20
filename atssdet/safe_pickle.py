"""Reading MegEngine ``.pkl`` / ``.pkl.gz`` weight files safely: no code runs, and small files stay small.

:class:`RestrictedUnpickler` resolves exactly the four globals such files use (``OrderedDict``,
numpy's ``_reconstruct``, ``ndarray``, ``dtype``) and refuses every other one, so a malicious pickle
cannot run code. Resource limits: a checkpoint (decompressed, for ``.pkl.gz``) may be at most
:func:`max_checkpoint_bytes` long, counted while streaming before anything is kept; every array the
pickle builds must be numeric and backed by exactly as many bytes of the file as its shape and dtype
declare; ``numpy.ndarray`` is never called directly. :mod:`atssdet.convert` builds on this.
"""

from __future__ import annotations

import collections
import gzip
import math
import os
import pickle
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

# resx101 (the largest zoo model) is ~380 MB; 2 GiB leaves room for training checkpoints and wider models.
DEFAULT_MAX_CHECKPOINT_BYTES = 2 * 2**30
MAX_CHECKPOINT_BYTES_ENV = "ATSSDET_MAX_CHECKPOINT_BYTES"
_GZIP_MAGIC = b"\x1f\x8b"
_ARRAY_KINDS = "biufc"  # bool, signed/unsigned int, float, complex: dtypes whose bytes are the data


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the problem."""


def max_checkpoint_bytes() -> int:
    """The checkpoint size limit in force: ``$ATSSDET_MAX_CHECKPOINT_BYTES`` if set, else 2 GiB."""
    text = os.environ.get(MAX_CHECKPOINT_BYTES_ENV)
    if not text:
        return DEFAULT_MAX_CHECKPOINT_BYTES
    if not (text.isascii() and text.isdigit()) or int(text) <= 0:
        raise ValueError(f"${MAX_CHECKPOINT_BYTES_ENV}={text!r}: expected a positive integer (bytes)")
    return int(text)


def _too_large(source: str, what: str, limit: int) -> CheckpointError:
    return CheckpointError(
        f"{source}: {what} more than {limit} bytes ({limit / 2**30:.3g} GiB), the checkpoint size limit "
        f"(the largest zoo checkpoint is ~380 MB); refusing to load it. If the file is genuine, raise "
        f"the limit with ${MAX_CHECKPOINT_BYTES_ENV}=BYTES or max_bytes="
    )


def check_file_size(path: Path, limit: int) -> None:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    if size > limit:
        raise _too_large(str(path), f"the file is {size} bytes,", limit)


def _count_gunzipped(f: IO[bytes], limit: int, source: str) -> None:
    """Stream-decompress ``f`` once without keeping anything; refuse when it unpacks past ``limit``."""
    buf = bytearray(1 << 20)
    total = 0
    try:
        with gzip.GzipFile(fileobj=f) as gz:
            while n := gz.readinto(buf):
                total += n
                if total > limit:
                    raise _too_large(source, "the gzip data decompresses to", limit)
    except (OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{source}: corrupt or truncated gzip data: {exc}") from exc


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 renamed numpy.core to numpy._core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


class _PendingArray:
    """What ``_reconstruct`` returns while unpickling: the array is built (checked) by ``__setstate__``.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` then BUILD with
    ``(version, shape, dtype, is_fortran, rawdata)``; checking the state before numpy sees it is
    what keeps a few bytes from declaring a huge or object-typed array.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise CheckpointError(f"{self.source}: refusing to load: malformed numpy array state")
        shape, dtype, _, rawdata = state[-4:]
        if not isinstance(shape, tuple) or len(shape) > 32 or not all(_is_size(d) for d in shape):
            raise CheckpointError(f"{self.source}: refusing to load: invalid array shape {shape!r}"[:300])
        if (
            not isinstance(dtype, np.dtype)
            or dtype.hasobject
            or dtype.kind not in _ARRAY_KINDS
            or dtype.shape
        ):
            raise CheckpointError(
                f"{self.source}: refusing to load: array of dtype {dtype!r}; a MegEngine weight file holds "
                "numeric arrays only (object arrays can hold anything and take any amount of memory)"
            )
        declared = math.prod(shape) * dtype.itemsize
        if not isinstance(rawdata, bytes | bytearray) or len(rawdata) != declared:
            held = len(rawdata) if isinstance(rawdata, bytes | bytearray) else type(rawdata).__name__
            raise CheckpointError(
                f"{self.source}: refusing to load: an array declares shape {shape} {dtype} = {declared} "
                f"bytes, but the file holds {held} bytes for it (corrupt or crafted file)"
            )
        array = _numpy_reconstruct()(np.ndarray, (0,), b"b")
        array.__setstate__(state)
        self.array = array


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals MegEngine weight files need; anything else raises :class:`CheckpointError`.

    ``numpy.ndarray`` stands for itself only as ``_reconstruct``'s first argument (calling it, which
    allocates any shape from a few bytes, is refused), and ``_reconstruct`` yields a
    :class:`_PendingArray` whose state is checked; :meth:`load` returns real arrays.
    """

    def __init__(self, file: IO[bytes], *, source: str) -> None:
        super().__init__(file)
        self.source = source

        def ndarray(*args: Any) -> Any:
            raise CheckpointError(
                f"{source}: refusing to load: the pickle calls numpy.ndarray directly, which a MegEngine "
                "weight file never does (it allocates an array of any size without data behind it)"
            )

        def reconstruct(cls: Any, shape: Any, dtype: Any) -> _PendingArray:
            if cls is not ndarray or shape != (0,) or dtype != b"b":
                raise CheckpointError(
                    f"{source}: refusing to load: unexpected numpy _reconstruct arguments "
                    f"({type(cls).__name__}, {shape!r}, {dtype!r})"[:300]
                )
            return _PendingArray(source)

        self._globals: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self.source}: refusing to load: the pickle references {module}.{name}, which a "
                "MegEngine weight file never contains (only OrderedDict and numpy arrays are allowed); "
                "the file may be malicious or not a MegEngine checkpoint"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: refusing to load: the pickle uses persistent ids")

    def load(self) -> Any:
        return _materialize(super().load(), self.source, depth=0)


def _materialize(obj: Any, source: str, *, depth: int) -> Any:
    """``obj`` with every :class:`_PendingArray` replaced by its array (mappings, lists and tuples)."""
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise CheckpointError(f"{source}: refusing to load: a numpy array without its data")
        return obj.array
    if depth > 8:
        return obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _materialize(value, source, depth=depth + 1)
    elif isinstance(obj, list):
        obj[:] = [_materialize(v, source, depth=depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        obj = tuple(_materialize(v, source, depth=depth + 1) for v in obj)
    return obj


def load_megengine_pickle(
    path: str | os.PathLike[str], *, max_bytes: int | None = None
) -> collections.OrderedDict[str, np.ndarray]:
    """Read a MegEngine ``.pkl`` (optionally gzip-compressed) into an ordered ``{key: float32 array}``.

    Accepts the hub format (a flat mapping) and training checkpoints (``{"epoch", "state_dict"}``).
    ``max_bytes`` (default :func:`max_checkpoint_bytes`) caps the file and, for gzip, the decompressed
    stream, which is counted in a first streaming pass that keeps nothing; the pickle is then read
    straight from the (decompressing) stream, so memory is the arrays it holds.
    """
    path = Path(path)
    limit = max_checkpoint_bytes() if max_bytes is None else max_bytes
    check_file_size(path, limit)
    try:
        with open(path, "rb") as f:
            stream: IO[bytes] = f
            if f.read(2) == _GZIP_MAGIC:
                f.seek(0)
                _count_gunzipped(f, limit, str(path))
                f.seek(0)
                stream = gzip.GzipFile(fileobj=f)  # type: ignore[assignment]
            else:
                f.seek(0)
            obj = _unpickle(stream, path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a mapping of arrays, found {type(obj).__name__}")
    out: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(
                f"{path}: entry {key!r} is {type(value).__name__}, expected a numpy array under a str key"
            )
        out[key] = value
    return out


def _unpickle(stream: IO[bytes], path: Path) -> Any:
    try:
        head = stream.read(1)
        stream.seek(0)
    except (OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated gzip data: {exc}") from exc
    if head != b"\x80":
        raise CheckpointError(f"{path}: not a pickle file (a MegEngine .pkl starts with a protocol header)")
    try:
        return RestrictedUnpickler(stream, source=str(path)).load()
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or garbled pickle streams raise many types
        raise CheckpointError(f"{path}: corrupt or truncated pickle: {type(exc).__name__}: {exc}") from exc
