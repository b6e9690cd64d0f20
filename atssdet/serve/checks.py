"""Request checking for the HTTP API: uploads, options and body size; every refusal is an :class:`ApiError`.

Option values are validated by :class:`atssdet.options.InferenceOptions` and class lists parsed by
:func:`atssdet.options.parse_classes`; :func:`request_options` is the one place that turns their
:class:`~atssdet.options.OptionError` into HTTP 422.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atssdet.data.image_io import ImageReadError, decode_image, sniff_format
from atssdet.options import InferenceOptions, OptionError, parse_classes


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_upload(data: bytes, *, filename: str) -> np.ndarray:
    """Upload bytes -> BGR uint8 ``[H, W, 3]``; :class:`ApiError` 422 (empty/corrupt) or 415 (not an image)."""
    try:
        return decode_image(data, source=filename)
    except ImageReadError as exc:
        # An upload that starts like a format OpenCV decodes but does not decode is corrupt (422);
        # anything else is not an image format we know (415).
        if len(data) == 0 or sniff_format(data) is not None:
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
) -> InferenceOptions:
    """``defaults`` with the request's options (None = keep the default); :class:`ApiError` 422 if invalid.

    ``classes``: comma-separated class names (case-insensitive) or label ids 0..C-1 of
    ``class_names``; None or blank keeps every class. The message names the option.
    """
    try:
        ids = parse_classes(classes, class_names)
    except OptionError as exc:  # its message names the entry; say which field held it
        raise ApiError(422, f"classes: {exc}") from None
    try:
        return defaults.replace(score_threshold=score_threshold, classes=ids, class_agnostic=class_agnostic)
    except OptionError as exc:
        raise ApiError(422, str(exc)) from None


class BodyLimit:
    """ASGI middleware: request bodies over ``max_mb`` get 413 JSON (declared or streamed size)."""

    def __init__(self, app: ASGIApp, *, max_mb: float) -> None:
        self.app = app
        self.max_bytes = int(max_mb * 2**20)
        self.max_mb = max_mb

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

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the app's handler.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)
