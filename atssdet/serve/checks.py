"""Request checking for the HTTP API: uploads, options, body size and time, pixels in flight.

Every refusal is an :class:`ApiError`. Option values are validated by
:class:`atssdet.options.InferenceOptions` and class lists parsed by
:func:`atssdet.options.parse_classes`; :func:`request_options` is the one place that turns their
:class:`~atssdet.options.OptionError` into HTTP 422. :class:`PixelBudget` bounds the decoded pixels
of the requests in flight (sized from the image header, before decoding); :class:`BodyLimit` bounds
the request body's size and the time it takes to arrive.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atssdet.data.image_io import (
    ImageReadError,
    decode_image,
    image_size_from_header,
    max_image_pixels,
    sniff_format,
)
from atssdet.options import InferenceOptions, OptionError, SliceOptions, parse_classes

RETRY_AFTER_S = 1  # what a 503 tells the client to wait


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status`` (and extra response ``headers``)."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def busy(message: str) -> ApiError:
    """503 with ``Retry-After``: the request was fine, the server has no room for it now."""
    return ApiError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def decode_upload(data: bytes, *, filename: str) -> np.ndarray:
    """Upload bytes -> BGR uint8 ``[H, W, 3]``; :class:`ApiError` 422 (empty/corrupt) or 415 (not an image)."""
    try:
        return decode_image(data, source=filename)
    except ImageReadError as exc:
        # An upload that starts like a format OpenCV decodes but does not decode is corrupt (422);
        # anything else is not an image format we know (415).
        fmt = sniff_format(data)
        if isinstance(exc.__cause__, cv2.error):  # its text names OpenCV's source files: not for clients
            raise ApiError(
                422, f"{filename}: corrupt {fmt or 'image'} data (OpenCV cannot decode it)"
            ) from None
        if len(data) == 0 or fmt is not None:
            raise ApiError(422, str(exc)) from None
        head = data[:8]
        raise ApiError(
            415,
            f"{filename}: not a supported image format (starts with {head!r}); "
            "send JPEG, PNG, BMP, TIFF, WebP, GIF or another format OpenCV decodes",
        ) from None


def request_options(
    defaults: InferenceOptions,
    class_names: Sequence[str],
    *,
    score_threshold: float | None = None,
    classes: str | None = None,
    class_agnostic: bool | None = None,
    slice_size: int | None = None,
    slice_overlap: float | None = None,
) -> InferenceOptions:
    """``defaults`` with the request's options (None = keep the default); :class:`ApiError` 422 if invalid.

    ``classes``: comma-separated class names (case-insensitive) or label ids 0..C-1 of
    ``class_names``; None or blank keeps every class. The message names the option.
    ``slice_size`` (with ``slice_overlap``, default 0.2) turns on sliced inference (:mod:`atssdet.slicing`).
    """
    try:
        ids = parse_classes(classes, class_names)
    except OptionError as exc:  # its message names the entry; say which field held it
        raise ApiError(422, f"classes: {exc}") from None
    try:
        if slice_size is None and slice_overlap is not None:
            raise OptionError("slice_overlap needs slice (the tile size)")
        slicing = (
            None if slice_size is None else SliceOptions(size=slice_size, overlap=_first(slice_overlap, 0.2))
        )
        return defaults.replace(
            score_threshold=score_threshold, classes=ids, class_agnostic=class_agnostic, slicing=slicing
        )
    except OptionError as exc:
        raise ApiError(422, str(exc)) from None


def check_slice_fits(options: InferenceOptions, height: int, width: int, filename: str) -> None:
    """:class:`ApiError` 422 when the request's slice size is larger than its image."""
    if options.slicing is not None:
        from atssdet.slicing import tile_windows

        try:
            tile_windows(height, width, options.slicing.size, options.slicing.overlap)
        except OptionError as exc:
            raise ApiError(422, f"{filename}: {exc}") from None


def _first(value: Any, default: Any) -> Any:
    return default if value is None else value


def upload_pixels(data: bytes) -> int:
    """Pixels the upload will decode to, from its header; unknown headers count as the most allowed."""
    size = image_size_from_header(data) if data else (0, 0)
    return max_image_pixels() if size is None else size[0] * size[1]


class PixelReservation:
    """Pixels held for one request until :meth:`release` (idempotent)."""

    def __init__(self, budget: PixelBudget, pixels: int) -> None:
        self.budget = budget
        self.pixels = pixels

    def resize(self, pixels: int) -> None:
        """Hold ``pixels`` instead (the decoded size, once known)."""
        self.budget._adjust(pixels - self.pixels)
        self.pixels = pixels

    def release(self) -> None:
        self.resize(0)


class PixelBudget:
    """Decoded pixels of the requests in flight (decoding, queued or running) are at most ``capacity``.

    A BGR image takes 3 bytes a pixel, so ``capacity`` bounds the server's image memory. A request is
    sized from its header before it is decoded; one that does not fit now gets 503 with Retry-After,
    one that could never fit gets 413.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the pixel budget must be >= 1 pixel, got {capacity}")
        self.capacity = capacity
        self.in_use = 0
        self._lock = threading.Lock()

    def reserve(self, pixels: int, *, filename: str) -> PixelReservation:
        if pixels > self.capacity:
            raise ApiError(
                413,
                f"{filename}: the image has {pixels} pixels, more than the server's in-flight budget of "
                f"{self.capacity} pixels (--max-inflight-megapixels); send a smaller image",
            )
        with self._lock:
            if self.in_use + pixels > self.capacity:
                in_use = self.in_use
            else:
                self.in_use += pixels
                return PixelReservation(self, pixels)
        raise busy(
            f"{filename}: server busy: {in_use} of {self.capacity} pixels are being decoded or detected and "
            f"this image needs {pixels}; retry in {RETRY_AFTER_S} s"
        )

    def _adjust(self, delta: int) -> None:
        with self._lock:
            self.in_use += delta


class BodyLimit:
    """ASGI middleware: request bodies over ``max_mb`` get 413 JSON (declared or streamed size), and
    bodies that have not fully arrived ``timeout_s`` after the request started get 408 (slow senders
    would otherwise hold a connection and its buffers for ever)."""

    def __init__(self, app: ASGIApp, *, max_mb: float, timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = int(max_mb * 2**20)
        self.max_mb = max_mb
        self.timeout_s = timeout_s

    def _message(self) -> str:
        return f"request body larger than the {self.max_mb:g} MB upload limit"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"error": self._message()}, status_code=413)(scope, receive, send)
            return
        received = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body: waiting for a disconnect may take any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                # An HTTPException passes through FastAPI's body parsing to the app's handler.
                raise StarletteHTTPException(
                    408, f"request body not received within {self.timeout_s:g} s ({received} bytes arrived)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise StarletteHTTPException(413, self._message())
            else:
                complete = True
            return message

        await self.app(scope, limited_receive, send)
