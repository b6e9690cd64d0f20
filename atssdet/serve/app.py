"""The FastAPI application: routes, response models and error handlers (see ``docs/serving.md``).

``create_app`` takes one :class:`~atssdet.detector.Detector` and builds one :class:`DynamicBatcher`
whose worker calls it; the routes read them from ``app.state``. Uploads are decoded on the event loop's
thread pool, never on the loop itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from atssdet.config import ATSSConfig
from atssdet.detector import Detector
from atssdet.options import InferenceOptions
from atssdet.serve.batcher import DynamicBatcher, ServerBusy
from atssdet.serve.checks import ApiError, BodyLimit, decode_upload, request_options
from atssdet.structures import Detections


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
) -> FastAPI:
    """The FastAPI app serving ``detector`` (see :func:`~atssdet.serve.server.serving_detector`).

    Its config supplies the inference settings (test sizes, ``test_*`` defaults, class names). The
    batching worker thread (``app.state.batcher``) starts with the app (or at the first request) and
    stops at shutdown.
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

    app = FastAPI(title="atssdet", summary="ATSS object detection over HTTP", version="1", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.served = _Served(
        model_name=model_name,
        cfg=cfg,
        device=str(device),
        defaults=InferenceOptions.from_config(cfg),
        limits={"max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_upload_mb": max_upload_mb},
        page=resources.files("atssdet").joinpath("static/index.html").read_text(encoding="utf-8"),
    )
    app.add_middleware(BodyLimit, max_mb=max_upload_mb)
    _add_error_handlers(app)
    app.include_router(router)
    return app


def _error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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
        return _error_response(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(422, _validation_summary(exc), detail=jsonable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}")


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
        (413, "upload larger than --max-upload-mb"),
        (415, "the upload is not an image format OpenCV knows"),
        (422, "missing file field, empty or corrupt image, or a bad option"),
        (500, "inference failed (the server keeps serving)"),
        (503, "request queue full"),
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
    )
    filename = file.filename or "upload"
    data = await file.read()
    image = await run_in_threadpool(decode_upload, data, filename=filename)
    t1 = time.perf_counter()
    try:
        future = batcher.submit(image, options)
    except ServerBusy as exc:
        raise ApiError(503, str(exc)) from None
    try:
        result = await asyncio.wrap_future(future)
    except Exception as exc:
        raise ApiError(500, f"inference failed: {type(exc).__name__}: {exc}") from None
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
