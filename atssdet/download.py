"""Fetching the official zoo checkpoints: download once, verify, convert once, then work offline.

``fetch_pretrained(entry)`` returns ``<cache>/<name>.safetensors``. The first call downloads
``entry.url`` (base overridable with ``$ATSSDET_URL_BASE``) into ``atssdet.zoo.cache_dir()``
(``$ATSSDET_HOME``, default ``~/.cache/atssdet``) with a progress bar. Bytes go to a temp file in the
same folder; the file is checked (byte count against Content-Length, then every key and shape
against the model and every value finite, via the restricted unpickler) and converted to
safetensors (written atomically) before it is renamed to its final name. So a truncated, interrupted
or corrupt download never leaves a file that a later run would trust: the temp file is deleted and
the error names the URL and says where to put the file by hand.

Later calls find the safetensors file and use no network. A MegEngine ``.pkl`` placed by hand at
``<cache>/<official file name>`` is verified and converted on the next call.
"""

from __future__ import annotations

import http.client
import logging
import urllib.error
import urllib.request
from pathlib import Path

from atssdet.convert import (
    CheckpointError,
    load_megengine_pickle,
    max_checkpoint_bytes,
    megengine_to_torch,
    save_safetensors,
)
from atssdet.fileio import atomic_path
from atssdet.safe_pickle import MAX_CHECKPOINT_BYTES_ENV
from atssdet.zoo import ZooEntry, cache_dir

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60.0


class DownloadError(CheckpointError):
    """A zoo checkpoint could not be fetched or failed verification; the message names the URL."""


def raw_path(entry: ZooEntry) -> Path:
    """Where the official MegEngine file lives in the cache (also where to put it by hand)."""
    return cache_dir() / entry.filename


def converted_path(entry: ZooEntry) -> Path:
    """The converted ``<cache>/<name>.safetensors`` that loads use."""
    return cache_dir() / f"{entry.name}.safetensors"


def cache_status(entry: ZooEntry) -> str:
    """``"converted"`` (ready offline), ``"downloaded"`` (.pkl present, converted on next load) or ``"no"``."""
    if converted_path(entry).is_file():
        return "converted"
    if raw_path(entry).is_file():
        return "downloaded"
    return "no"


def _manual_help(entry: ZooEntry) -> str:
    return (
        f"To install it by hand, download {entry.url} on a machine with internet access, then either "
        f"pass the file directly (atssdet.load({entry.name!r}, weights=PATH), or --model {entry.name} "
        f"--weights PATH on the command line) or copy it to {raw_path(entry)} (it is verified and converted on the next load). "
        "Set ATSSDET_URL_BASE to download from a mirror."
    )


def download_file(
    url: str,
    dst: Path,
    *,
    desc: str | None = None,
    progress: bool = True,
    timeout: float = _TIMEOUT_S,
    max_bytes: int | None = None,
) -> None:
    """Download ``url`` into ``dst`` (a temp file from :func:`atssdet.fileio.atomic_path`: the caller
    verifies it before it is renamed into place). A failure raises :class:`DownloadError`; a byte
    count different from ``Content-Length`` (a connection closed early), an empty body and a body
    over ``max_bytes`` (default :func:`~atssdet.convert.max_checkpoint_bytes`; an endless or huge
    response would fill the disk) are. ``desc`` labels the progress bar (default: ``dst``'s name).
    """
    from tqdm import tqdm

    limit = max_checkpoint_bytes() if max_bytes is None else max_bytes
    received = 0
    expected: int | None = None
    with open(dst, "wb") as f:
        request = urllib.request.Request(url, headers={"User-Agent": "atssdet"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length")
                expected = int(length) if length is not None and length.strip().isdigit() else None
                if expected is not None and expected > limit:
                    raise _over_limit(url, f"the server announces {expected} bytes,", limit)
                with tqdm(
                    total=expected,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=desc or dst.name,
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(_CHUNK_BYTES):
                        received += len(chunk)
                        if received > limit:
                            raise _over_limit(url, "the download is", limit)
                        f.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise DownloadError(f"{url}: cannot connect: {exc.reason}") from exc
        except http.client.IncompleteRead as exc:
            got = received + len(exc.partial)
            raise DownloadError(
                f"{url}: download interrupted after {got} of {expected or '?'} bytes (truncated)"
            ) from exc
        except (http.client.HTTPException, OSError) as exc:  # timeouts, resets
            raise DownloadError(
                f"{url}: download failed after {received} bytes: {type(exc).__name__}: {exc}"
            ) from exc
    if expected is not None and received != expected:
        raise DownloadError(
            f"{url}: download incomplete: received {received} bytes, Content-Length says {expected} (truncated)"
        )
    if received == 0:
        raise DownloadError(f"{url}: the server sent an empty file")


def _over_limit(url: str, what: str, limit: int) -> DownloadError:
    return DownloadError(
        f"{url}: {what} more than {limit} bytes, the checkpoint size limit (${MAX_CHECKPOINT_BYTES_ENV}); "
        "stopped, nothing kept"
    )


def verify_and_convert(entry: ZooEntry, pkl_path: Path, *, source: str) -> Path:
    """Check ``pkl_path`` against ``entry``'s model (every key and shape, finite values) and write
    ``converted_path(entry)`` atomically. ``source`` names the file in errors."""
    from atssdet.modeling.atss import build_model

    model = build_model(entry.config)
    try:
        arrays = load_megengine_pickle(pkl_path)
    except CheckpointError as exc:
        # The message names the temp path; say what it really is.
        raise CheckpointError(str(exc).replace(str(pkl_path), source)) from exc
    state = megengine_to_torch(arrays, model, source=source)
    return save_safetensors(state, converted_path(entry), cfg=entry.config)


def _usable_safetensors(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return len(list(f.keys())) > 0
    except Exception:
        return False


def fetch_pretrained(entry: ZooEntry, *, progress: bool = True) -> Path:
    """Path of ``entry``'s verified safetensors weights in the cache, downloading and converting once."""
    converted = converted_path(entry)
    if converted.is_file():
        if _usable_safetensors(converted):
            return converted
        # Our own derived file, written atomically; if it is unreadable (disk trouble), rebuild it.
        logger.warning("%s is unreadable; rebuilding it", converted)
        converted.unlink()
    raw = raw_path(entry)
    if raw.is_file():
        # Placed by hand or kept from an earlier run: verify before trusting, never delete it.
        try:
            return verify_and_convert(entry, raw, source=str(raw))
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}\nThe cached file {raw} is not a valid {entry.name} checkpoint; delete it to "
                f"download again from {entry.url}, or replace it with a good copy."
            ) from exc
    url = entry.url
    logger.info("downloading %s to %s", url, raw)
    # The download lands in a temp file beside `raw` that is renamed only once verified and converted.
    try:
        with atomic_path(raw, suffix=".part") as tmp:
            download_file(url, tmp, desc=raw.name, progress=progress)
            converted = verify_and_convert(entry, tmp, source=url)
    except DownloadError as exc:
        raise DownloadError(
            f"cannot download pretrained weights for {entry.name}: {exc}\n{_manual_help(entry)}"
        ) from exc
    except CheckpointError as exc:
        raise DownloadError(
            f"the file downloaded from {url} is not a valid {entry.name} checkpoint and was deleted: "
            f"{exc}\n{_manual_help(entry)}"
        ) from exc
    return converted
