"""Reading images exactly as ``cv2.imread(path)`` would (BGR uint8), with errors that name the file.

Every image that OpenCV decodes completely comes back as ``cv2.imread`` returns it: grey, RGBA,
16-bit and palette images are converted to 8-bit BGR by OpenCV itself, and the EXIF orientation
is applied. Three cases differ on purpose and raise :class:`ImageReadError` instead:

* a *truncated JPEG* (no end-of-image marker after its last scan): ``cv2.imread`` decodes such a
  file partially, filling the missing rows with grey, and only prints a warning. A half-grey image
  is silently wrong training data, so it is refused;
* an image whose header declares more than ``max_pixels`` pixels (a decompression bomb: a few KB
  of PNG can declare a 50000 x 50000 image). The default is :data:`DEFAULT_MAX_PIXELS`
  (100 megapixels, 300 MB once decoded); the ``ATSSDET_MAX_IMAGE_PIXELS`` environment variable or
  the ``max_pixels=`` argument change it. The size is read from the header before decoding;
* an empty file, a file that is not an image, or data OpenCV cannot decode;
* a path that is not a regular file (a folder, a FIFO, a device): ``cv2.imread`` would block on a
  FIFO with no writer, or read a device forever.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import cv2
import numpy as np

from atssdet.errors import ImageReadError, cv2_message

DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "ATSSDET_MAX_IMAGE_PIXELS"

_JPEG_MAGIC = b"\xff\xd8"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Leading bytes of the formats OpenCV decodes, with their names: tells "corrupt PNG" from "not an
# image at all" here, and a corrupt upload (HTTP 422) from an unsupported one (415) in the server.
IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (_JPEG_MAGIC, "JPEG"),
    (_PNG_MAGIC, "PNG"),
    (b"GIF8", "GIF"),  # GIF87a, GIF89a
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),  # little-endian
    (b"MM\x00*", "TIFF"),  # big-endian
    (b"RIFF", "WebP"),  # RIFF....WEBP
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),  # codestream
    (b"#?RADIANCE", "HDR"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"P1", "PBM"),
    (b"P2", "PGM"),
    (b"P3", "PPM"),
    (b"P4", "PBM"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
    (b"P7", "PAM"),
    (b"\x59\xa6\x6a\x95", "Sun raster"),
)


def max_image_pixels() -> int:
    """The pixel limit in force: ``$ATSSDET_MAX_IMAGE_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"${MAX_PIXELS_ENV}={text!r}: expected a positive integer") from None
    if value <= 0:
        raise ValueError(f"${MAX_PIXELS_ENV}={text!r}: expected a positive integer")
    return value


def sniff_format(data: bytes) -> str | None:
    """The image format named by the magic number at the start of ``data`` (e.g. "PNG"), or None."""
    for magic, name in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    # IHDR is the first chunk: length (4), b"IHDR", width (4), height (4), big-endian.
    if len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    # Walk the marker segments up to the first SOFn frame header (height, width at offsets 5, 7).
    pos = 2
    n = len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return height, width
        if marker == 0xDA or length < 2:  # start of scan before any frame header: malformed
            return None
        pos += 2 + length
    return None


def _other_size(data: bytes) -> tuple[int, int] | None:
    # Other formats: Pillow (a matplotlib dependency) reads the header lazily without decoding.
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow ships with matplotlib
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Image.DecompressionBombError:  # above Pillow's own limit: read the header anyway
            return _pillow_size_unchecked(data)
        except Exception:  # unknown to Pillow: OpenCV's own 2^30-pixel limit still applies
            return None
    return height, width


def _pillow_size_unchecked(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` from the header through Pillow's format plugins, without the
    decompression-bomb check of ``Image.open`` (which hides the real size of a 15000 x 15000 TIFF)."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            accepted = accept(prefix) if accept is not None else True
            if isinstance(accepted, str) or not accepted:
                continue
            with factory(io.BytesIO(data), "") as im:
                width, height = im.size
        except Exception:  # noqa: S112 - not this format: try the next plugin
            continue
        return height, width
    return None


def image_size_from_header(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` as stored in the header (before any EXIF rotation), or None if unknown."""
    fmt = sniff_format(data)
    if fmt == "PNG":
        return _png_size(data)
    if fmt == "JPEG":
        return _jpeg_size(data)
    return _other_size(data)


def _jpeg_is_truncated(data: bytes) -> bool:
    """True if no end-of-image marker follows the last start-of-scan (the file stops mid-image).

    Entropy-coded data escapes 0xFF as 0xFF00, so 0xFFD9 after the last 0xFFDA is the real EOI; an
    EXIF thumbnail's own EOI lies before the main image's scans and does not count.
    """
    tail = data[-64:]  # fast path: almost every JPEG ends with its EOI marker
    if tail.rfind(b"\xff\xd9") > tail.rfind(b"\xff\xda"):
        return False
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan + 2) < 0


def decode_image(data: bytes, *, source: str = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Decode encoded image bytes to BGR uint8 ``[H, W, 3]`` like ``cv2.imread`` (see the module docstring).

    ``max_pixels`` caps ``H * W`` (default :func:`max_image_pixels`). Raises :class:`ImageReadError`
    whose message starts with ``source`` and gives the reason.
    """
    if len(data) == 0:
        raise ImageReadError(f"{source}: empty file (0 bytes)")
    limit = max_image_pixels() if max_pixels is None else max_pixels
    fmt = sniff_format(data)
    size = image_size_from_header(data)
    if size is not None:
        height, width = size
        if height * width > limit:
            raise ImageReadError(
                f"{source}: image is {width}x{height} = {height * width} pixels, above the limit of "
                f"{limit} (decompression-bomb guard; raise it with ${MAX_PIXELS_ENV} or max_pixels=)"
            )
        if height == 0 or width == 0:
            raise ImageReadError(f"{source}: {fmt} header declares an empty {width}x{height} image")
    if fmt == "JPEG" and _jpeg_is_truncated(data):
        raise ImageReadError(
            f"{source}: truncated JPEG (no end-of-image marker after the last scan; "
            f"{len(data)} bytes); the file is incomplete"
        )
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except MemoryError as exc:
        shown = f" {size[1]}x{size[0]}" if size is not None else ""
        raise ImageReadError(f"{source}: not enough memory to decode the{shown} {fmt or ''} image") from exc
    except cv2.error as exc:
        raise ImageReadError(f"{source}: OpenCV cannot decode it: {cv2_message(exc)}") from exc
    if image is None:
        if fmt is None:
            head = data[:8]
            raise ImageReadError(f"{source}: not an image (unrecognised file content starting with {head!r})")
        if fmt == "PNG" and data.rfind(b"IEND") < 0:
            raise ImageReadError(f"{source}: truncated PNG (no IEND chunk; {len(data)} bytes)")
        raise ImageReadError(f"{source}: corrupt or truncated {fmt} data (OpenCV cannot decode it)")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:  # pragma: no cover - IMREAD_COLOR
        raise ImageReadError(f"{source}: decoded to {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
    if size is None and image.shape[0] * image.shape[1] > limit:
        raise ImageReadError(
            f"{source}: image is {image.shape[1]}x{image.shape[0]} pixels, above the limit of {limit} "
            f"(raise it with ${MAX_PIXELS_ENV} or max_pixels=)"
        )
    return image


def read_image(path: str | os.PathLike[str], *, max_pixels: int | None = None) -> np.ndarray:
    """Read ``path`` into BGR uint8 ``[H, W, 3]``; raises :class:`ImageReadError` naming the file."""
    path = Path(path)
    try:
        data = _read_regular_file(path)
    except OSError as exc:
        hint = " (a symlink loop)" if exc.errno == errno.ELOOP else ""
        raise ImageReadError(f"{path}: cannot read: {exc.strerror or exc}{hint}") from exc
    except MemoryError as exc:
        raise ImageReadError(f"{path}: not enough memory to read the file") from exc
    return decode_image(data, source=str(path), max_pixels=max_pixels)


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _read_regular_file(path: Path) -> bytes:
    """The bytes of ``path``, refusing anything but a regular file without blocking: the file is
    opened non-blocking (a FIFO without a writer would wait forever) and checked after opening."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise ImageReadError(f"{path}: cannot read: not a regular file but {kind}")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
