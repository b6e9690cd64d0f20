"""The FastAPI application: routes, response models and error handlers (see ``docs/serving.md``).

``create_app`` takes one :class:`~atssdet.detector.Detector` and builds one :class:`DynamicBatcher`
whose worker calls it; the routes read them from ``app.state``. Uploads are sized from their header
against a :class:`~atssdet.serve.checks.PixelBudget`, then decoded on the event loop's thread pool,
never on the loop itself. Error bodies never carry exception types or server paths: an unexpected
error is logged with a request id, and the client gets the id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from atssdet.config import ATSSConfig
from atssdet.detector import Detector
from atssdet.options import InferenceOptions
from atssdet.serve.access import AccessGuard, AccessPolicy
from atssdet.serve.batcher import BatchResult, DynamicBatcher, ServerBusy
from atssdet.serve.checks import (
    ApiError,
    BodyLimit,
    PixelBudget,
    busy,
    check_slice_fits,
    decode_upload,
    request_options,
    upload_pixels,
)
from atssdet.structures import Detections

logger = logging.getLogger("atssdet.serve")


class ImageSize(BaseModel):
    width: int
    height: int


class Timing(BaseModel):
    decode: float = Field(description="reading and decoding the upload, ms")
    queue: float = Field(description="waiting for the batch to start, ms")
    inference: float = Field(description="the batch's resize + forward + post-processing, ms")
    total: float = Field(description="request received to response built, ms")


class DetectResponse(BaseModel):
    model: str
    image: ImageSize = Field(description="original image size; boxes are in its pixels")
    boxes: list[list[float]] = Field(description="[K, 4] x1, y1, x2, y2 in original pixels")
    scores: list[float] = Field(description="[K]")
    labels: list[int] = Field(description="[K] label ids 0..C-1")
    names: list[str] = Field(description="[K] class names")
    score_threshold: float
    classes: list[int] | None
    class_agnostic: bool
    batch_size: int = Field(description="requests that ran in the same inference call")
    timing_ms: Timing


class ErrorResponse(BaseModel):
    error: str
    request_id: str | None = Field(None, description="500 only: find the details in the server log")


@dataclass(frozen=True)
class _Served:
    """What the routes need to know about the served model (``app.state.served``)."""

    model_name: str
    cfg: ATSSConfig  # inference settings: test sizes, test_* defaults, class names
    device: str
    defaults: InferenceOptions  # a request's options before its own
    limits: dict[str, float]  # max_batch, max_wait_ms, max_upload_mb
    page: str  # the browser page's HTML


def _detect_batch(
    detector: Detector, images: list[np.ndarray], options: InferenceOptions
) -> list[Detections]:
    """Detections (original pixels, on the CPU) for BGR uint8 images ``[H_i, W_i, 3]``, in order.

    :meth:`Detector.predict` in one call: images are grouped by padded input size, so each gets
    exactly its batch-1 result (``DetEvaluator.predict``).
    """
    return detector.predict(images, batch_size=len(images), options=options)


def create_app(
    detector: Detector,
    *,
    model_name: str = "atss",
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    max_upload_mb: float = 20.0,
    max_queue: int = 1024,
    max_inflight_megapixels: float = 200.0,
    body_timeout_s: float = 60.0,
    access: AccessPolicy | None = None,
    docs: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``detector`` (see :func:`~atssdet.serve.server.serving_detector`).

    Its config supplies the inference settings (test sizes, ``test_*`` defaults, class names). The
    batching worker thread (``app.state.batcher``) starts with the app (or at the first request) and
    stops at shutdown. ``max_inflight_megapixels``: decoded pixels of the requests in flight (more
    get 503 + Retry-After); ``body_timeout_s``: time for a request body to arrive (else 408);
    ``access``: Host/Origin/token checks (None: none, for an app embedded behind its own checks;
    ``run_server`` requires one); ``docs``: FastAPI's ``/docs`` page, which loads Swagger UI from a
    CDN (``/openapi.json`` is always served).
    """
    cfg, device = detector.cfg, detector.device
    batcher = DynamicBatcher(
        partial(_detect_batch, detector), max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.stop)

    app = FastAPI(
        title="atssdet",
        summary="ATSS object detection over HTTP",
        version="1",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    app.state.batcher = batcher
    app.state.pixels = PixelBudget(int(max_inflight_megapixels * 1e6))
    app.state.access = access
    app.state.served = _Served(
        model_name=model_name,
        cfg=cfg,
        device=str(device),
        defaults=InferenceOptions.from_config(cfg),
        limits={"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_upload_mb": max_upload_mb},
        page=resources.files("atssdet").joinpath("static/index.html").read_text(encoding="utf-8"),
    )
    # Outermost last: CORS answers preflights, then the access checks, then the body limits.
    app.add_middleware(BodyLimit, max_mb=max_upload_mb, timeout_s=body_timeout_s)
    if access is not None:
        app.add_middleware(AccessGuard, policy=access)
        if access.cors_origins:
            from starlette.middleware.cors import CORSMiddleware

            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(access.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type"],
            )
    _add_error_handlers(app)
    app.include_router(router)
    return app


def _error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def internal_error(what: str, exc: BaseException) -> ApiError:
    """500 for the client (``what`` failed, a request id), the exception for the server log only."""
    request_id = uuid.uuid4().hex[:12]
    logger.error("request %s: %s", request_id, what, exc_info=exc)
    return ApiError(
        500,
        f"{what} (request id {request_id}; the server log has the details)",
        headers={"X-Request-ID": request_id},
    )


def _validation_summary(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Validation errors without the raw input (which may be a whole upload)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers JSON ``{"error": message}`` (validation errors add FastAPI's ``detail``)."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        request_id = (exc.headers or {}).get("X-Request-ID")
        extra = {"request_id": request_id} if request_id else {}
        return _error_response(exc.status, exc.message, exc.headers, **extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_summary(exc), detail=jsonable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        err = internal_error(f"{request.method} {request.url.path}: internal error", exc)
        return await _api_error(request, err)


def config_summary(cfg: ATSSConfig) -> dict[str, Any]:
    keys = (
        "backbone",
        "num_classes",
        "fpn_out_channels",
        "stride",
        "test_image_short_size",
        "test_image_max_size",
        "test_cls_threshold",
        "test_nms",
        "test_max_boxes_per_image",
        "test_vis_threshold",
    )
    return {k: getattr(cfg, k) for k in keys}


router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "Host header not a name of this server (--allowed-host)"),
        (401, "missing or wrong 'Authorization: Bearer TOKEN' (--token)"),
        (403, "cross-origin request from an origin not in --cors-origin"),
        (408, "request body not received in time"),
        (413, "upload larger than --max-upload-mb, or more pixels than the in-flight budget"),
        (415, "the upload is not an image format OpenCV knows"),
        (422, "missing file field, empty or corrupt image, or a bad option"),
        (500, "inference failed (the server keeps serving); the body has a request id"),
        (503, "busy: pixels in flight or queue full, or out of memory (Retry-After)"),
    )
}
_THRESHOLD_HELP = "keep scores above this (0..1)"
_CLASSES_HELP = "comma-separated class names or ids"
_AGNOSTIC_HELP = "one NMS over all classes"


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


@router.post("/v1/detect", response_model=DetectResponse, responses=_ERRORS)
async def detect(
    request: Request,
    file: Annotated[UploadFile, File(description="the image (JPEG, PNG, BMP, TIFF, WebP, ...)")],
    score_threshold: Annotated[float | None, Form(description=_THRESHOLD_HELP)] = None,
    classes: Annotated[str | None, Form(description=_CLASSES_HELP)] = None,
    class_agnostic: Annotated[bool | None, Form(description=_AGNOSTIC_HELP)] = None,
    score_threshold_query: Annotated[
        float | None, Query(alias="score_threshold", description=_THRESHOLD_HELP)
    ] = None,
    classes_query: Annotated[str | None, Query(alias="classes", description=_CLASSES_HELP)] = None,
    class_agnostic_query: Annotated[
        bool | None, Query(alias="class_agnostic", description=_AGNOSTIC_HELP)
    ] = None,
    slice_size: Annotated[int | None, Query(alias="slice", description="sliced inference: tile side")] = None,
    slice_overlap: Annotated[float | None, Query(description="tile overlap in [0, 1) (0.2)")] = None,
) -> DetectResponse:
    """Detect objects in one uploaded image. Options may come as form fields or query parameters
    (form wins); defaults: the model's score threshold, all classes, per-class NMS."""
    t0 = time.perf_counter()
    served: _Served = request.app.state.served
    batcher: DynamicBatcher = request.app.state.batcher
    options = request_options(
        served.defaults,
        served.cfg.class_names,
        score_threshold=_first(score_threshold, score_threshold_query),
        classes=_first(classes, classes_query),
        class_agnostic=_first(class_agnostic, class_agnostic_query),
        slice_size=slice_size,
        slice_overlap=slice_overlap,
    )
    filename = file.filename or "upload"
    data = await file.read()
    budget: PixelBudget = request.app.state.pixels
    reservation = budget.reserve(upload_pixels(data), filename=filename)
    try:
        image = await run_in_threadpool(decode_upload, data, filename=filename)
        reservation.resize(image.shape[0] * image.shape[1])
        check_slice_fits(options, image.shape[0], image.shape[1], filename)
        t1 = time.perf_counter()
        result = await _infer(batcher, image, options, filename)
    finally:
        reservation.release()
    d = result.detections
    labels = d.labels.tolist()
    return DetectResponse(
        model=served.model_name,
        image=ImageSize(width=int(image.shape[1]), height=int(image.shape[0])),
        boxes=d.boxes.double().tolist(),
        scores=d.scores.double().tolist(),
        labels=labels,
        names=[served.cfg.class_names[i] for i in labels],
        score_threshold=options.score_threshold,
        classes=None if options.classes is None else list(options.classes),
        class_agnostic=options.class_agnostic,
        batch_size=result.batch_size,
        timing_ms=Timing(
            decode=(t1 - t0) * 1000.0,
            queue=result.queue_ms,
            inference=result.inference_ms,
            total=(time.perf_counter() - t0) * 1000.0,
        ),
    )


async def _infer(
    batcher: DynamicBatcher, image: np.ndarray, options: InferenceOptions, filename: str
) -> BatchResult:
    """The batcher's result for one image; its failures as ApiErrors without internals."""
    try:
        future = batcher.submit(image, options)
    except ServerBusy as exc:
        raise busy(f"{filename}: {exc}") from None
    described = f"{filename} ({image.shape[1]}x{image.shape[0]} pixels)"
    try:
        return await asyncio.wrap_future(future)
    except (MemoryError, torch.OutOfMemoryError):
        raise busy(f"{described}: out of memory while detecting; retry later") from None
    except Exception as exc:
        raise internal_error(f"inference failed for {described}", exc) from None


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """200 while the batching worker runs (or has not been needed yet), else 503."""
    served: _Served = request.app.state.served
    batcher: DynamicBatcher = request.app.state.batcher
    ok = batcher.healthy
    body = {
        "status": "ok" if ok else "unavailable",
        "model": served.model_name,
        "device": served.device,
        "queued": batcher.pending,
        "batches": batcher.batches,
        "requests": batcher.requests,
        "failed_batches": batcher.failures,
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    """The served model: name, class names (index = label id), config summary, serving limits."""
    served: _Served = request.app.state.served
    return {
        "models": [
            {
                "name": served.model_name,
                "device": served.device,
                "classes": list(served.cfg.class_names),
                "config": config_summary(served.cfg),
                "serving": served.limits,
            }
        ]
    }


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    served: _Served = request.app.state.served
    return HTMLResponse(served.page)
