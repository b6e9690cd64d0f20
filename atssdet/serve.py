"""Serving a detector over HTTP: a JSON API with dynamic batching and a one-page browser client.

    python -m atssdet serve --model atss_res18_coco_3x_800size --port 8000

Endpoints (see ``docs/serving.md``): ``POST /v1/detect`` (multipart image upload), ``GET /healthz``,
``GET /v1/models``, ``GET /`` (the page), ``GET /openapi.json`` and ``/docs`` (FastAPI's).

Requests are decoded on the event loop's thread pool, then queued for one worker thread that owns the
model. The worker takes the first waiting request, waits up to ``max_wait_ms`` for more (at most
``max_batch`` in all), and runs them together; requests that arrive while it computes are waiting
when it comes back, so batches grow with load. Inside a batch, requests with different options run
as separate calls and images with different padded input sizes as separate forward passes
(:mod:`atssdet.batching`), so every request gets exactly the detections it would get alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atssdet.config import ATSSConfig
from atssdet.data.image_io import ImageReadError, decode_image
from atssdet.modeling.atss import ATSS
from atssdet.postprocess import Detections
from atssdet.predict import Detector

# Leading bytes of the formats OpenCV decodes: an upload that starts like one of these but does not
# decode is corrupt (422); anything else is not an image format we know (415).
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"RIFF",  # WebP (RIFF....WEBP)
    b"\x00\x00\x00\x0cjP  ",  # JPEG 2000
    b"\xff\x4f\xff\x51",  # JPEG 2000 codestream
    b"#?RADIANCE",  # HDR
    b"\x76\x2f\x31\x01",  # OpenEXR
    b"P1",  # PBM/PGM/PPM/PAM
    b"P2",
    b"P3",
    b"P4",
    b"P5",
    b"P6",
    b"P7",
    b"\x59\xa6\x6a\x95",  # Sun raster
)


# --------------------------------------------------------------------------------------------------
# Inference: the one function that turns images into detections.


def _detect_batch(
    model: ATSS,
    images: list[np.ndarray],
    *,
    cfg: ATSSConfig,
    score_threshold: float,
    classes: Sequence[int] | None,
    class_agnostic: bool,
) -> list[Detections]:
    """Detections (original pixels, on the CPU) for BGR uint8 images ``[H_i, W_i, 3]``, in order.

    :meth:`atssdet.predict.Detector.predict` with ``cfg``'s test sizes and NMS settings: images are
    grouped by padded input size, so each gets exactly its batch-1 result (``DetEvaluator.predict``).
    ``classes`` (label ids 0..C-1) keeps only those classes; ``class_agnostic`` runs one NMS over all.
    """
    detector = Detector(
        model,
        device=next(model.parameters()).device,
        short_size=cfg.test_image_short_size,
        max_size=cfg.test_image_max_size,
    )
    return detector.predict(
        images,
        batch_size=len(images),
        score_threshold=score_threshold,
        nms_threshold=cfg.test_nms,
        max_detections=cfg.test_max_boxes_per_image,
        class_agnostic=class_agnostic,
        classes=None if classes is None else list(classes),
    )


# --------------------------------------------------------------------------------------------------
# Dynamic batching.


@dataclass(frozen=True)
class DetectOptions:
    """Per-request options; requests with equal options can share one :func:`_detect_batch` call."""

    score_threshold: float
    classes: tuple[int, ...] | None = None  # label ids 0..C-1, None = all
    class_agnostic: bool = False


@dataclass(frozen=True)
class BatchResult:
    """What the worker returns for one request."""

    detections: Detections
    queue_ms: float  # from submission to the start of its batch
    inference_ms: float  # the whole _detect_batch call it was part of
    batch_size: int  # images in that call


@dataclass
class _Job:
    image: np.ndarray  # BGR uint8 [H, W, 3]
    options: DetectOptions
    future: concurrent.futures.Future[BatchResult]
    submitted: float  # time.perf_counter()


class ServerBusy(RuntimeError):
    """The request queue is full."""


class DynamicBatcher:
    """One worker thread that owns the model and runs queued requests in batches.

    ``submit`` is thread-safe and returns a :class:`concurrent.futures.Future`; the worker collects up
    to ``max_batch`` requests, waiting at most ``max_wait_ms`` after the first for more. A failing
    batch fails only its own requests; the worker keeps running.
    """

    def __init__(
        self, model: ATSS, cfg: ATSSConfig, *, max_batch: int, max_wait_ms: float, max_queue: int = 1024
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.cfg = cfg
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.batches = 0
        self.requests = 0
        self.failures = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Running, or not needed yet (it starts at the first request); False once stopped or dead."""
        return self.alive or (self._thread is None and not self._stopping)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        with self._lock:
            if self.alive:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="atssdet-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the requests still queued, end the thread."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("server is shutting down"))

    def submit(self, image: np.ndarray, options: DetectOptions) -> concurrent.futures.Future[BatchResult]:
        if self._stopping:
            raise RuntimeError("server is shutting down")
        self.start()  # lazily, so an app driven without lifespan events (some test clients) works too
        future: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(image, options, future, time.perf_counter()))
        except queue.Full:
            raise ServerBusy(f"{self._queue.maxsize} requests already waiting; try again later") from None
        return future

    def _collect(self) -> tuple[list[_Job], bool]:
        """Block for one job, then take more until ``max_batch`` or the wait window ends; (jobs, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        stop = False
        while not stop:
            jobs, stop = self._collect()
            # A request whose client went away was cancelled: skip it (and never set its result).
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            by_options: dict[DetectOptions, list[_Job]] = {}
            for job in jobs:
                by_options.setdefault(job.options, []).append(job)
            for options, group in by_options.items():
                self._process(options, group)

    def _process(self, options: DetectOptions, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            dets = _detect_batch(
                self.model,
                [j.image for j in jobs],
                cfg=self.cfg,
                score_threshold=options.score_threshold,
                classes=options.classes,
                class_agnostic=options.class_agnostic,
            )
        except Exception as exc:  # one bad batch must not end the worker
            self.failures += 1
            for job in jobs:
                job.future.set_exception(exc)
            return
        end = time.perf_counter()
        self.batches += 1
        self.requests += len(jobs)
        for job, d in zip(jobs, dets, strict=True):
            job.future.set_result(
                BatchResult(
                    detections=d,
                    queue_ms=(start - job.submitted) * 1000.0,
                    inference_ms=(end - start) * 1000.0,
                    batch_size=len(jobs),
                )
            )


# --------------------------------------------------------------------------------------------------
# Request checking.


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
        if len(data) == 0 or data.startswith(_IMAGE_SIGNATURES):
            raise ApiError(422, str(exc)) from None
        head = data[:8]
        raise ApiError(
            415,
            f"{filename}: not a supported image format (starts with {head!r}); "
            "send JPEG, PNG, BMP, TIFF, WebP, GIF or another format OpenCV decodes",
        ) from None


def parse_classes(text: str | None, class_names: Sequence[str]) -> tuple[int, ...] | None:
    """``"person, 16, traffic light"`` -> sorted label ids; None/blank -> None (all classes).

    Items are class names (case-insensitive) or label ids 0..C-1; raises :class:`ApiError` 422.
    """
    if text is None or not text.strip():
        return None
    by_name = {n.lower(): i for i, n in enumerate(class_names)}
    ids: set[int] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            idx = int(item)
            if idx >= len(class_names):
                raise ApiError(422, f"classes: label id {idx} out of range 0..{len(class_names) - 1}")
            ids.add(idx)
        elif item.lower() in by_name:
            ids.add(by_name[item.lower()])
        else:
            raise ApiError(422, f"classes: unknown class {item!r} (see GET /v1/models for the names)")
    if not ids:
        return None
    return tuple(sorted(ids))


class _BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 JSON (declared or streamed size)."""

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
                    # An HTTPException passes through FastAPI's body parsing to our handler below.
                    raise StarletteHTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------------
# The application.


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


def _error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _validation_summary(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


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


def create_app(
    model: ATSS,
    *,
    model_name: str = "atss",
    cfg: ATSSConfig | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    max_upload_mb: float = 20.0,
    max_queue: int = 1024,
) -> FastAPI:
    """The FastAPI app serving ``model`` (in eval mode, on its device).

    ``cfg`` supplies the inference settings (test sizes, thresholds, class names; default
    ``model.cfg``). The batching worker thread starts with the app (or at the first request) and
    stops at shutdown.
    """
    cfg = cfg or model.cfg
    model.eval()
    batcher = DynamicBatcher(model, cfg, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    page = resources.files("atssdet").joinpath("static/index.html").read_text(encoding="utf-8")
    device = str(next(model.parameters()).device)
    class_names = list(cfg.class_names)

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
    )
    app.state.batcher = batcher
    app.add_middleware(_BodyLimit, max_mb=max_upload_mb)

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

    errors: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse, "description": text}
        for code, text in (
            (413, "upload larger than --max-upload-mb"),
            (415, "the upload is not an image format OpenCV knows"),
            (422, "missing file field, empty or corrupt image, or a bad option"),
            (500, "inference failed (the server keeps serving)"),
            (503, "request queue full"),
        )
    }

    @app.post("/v1/detect", response_model=DetectResponse, responses=errors)
    async def detect(
        file: Annotated[UploadFile, File(description="the image (JPEG, PNG, BMP, TIFF, WebP, ...)")],
        score_threshold: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
        classes: Annotated[str | None, Form(description="comma-separated class names or ids")] = None,
        class_agnostic: Annotated[bool | None, Form()] = None,
        score_threshold_query: Annotated[
            float | None, Query(alias="score_threshold", ge=0.0, le=1.0, description="keep scores above this")
        ] = None,
        classes_query: Annotated[
            str | None, Query(alias="classes", description="comma-separated class names or ids")
        ] = None,
        class_agnostic_query: Annotated[
            bool | None, Query(alias="class_agnostic", description="one NMS over all classes")
        ] = None,
    ) -> DetectResponse:
        """Detect objects in one uploaded image. Options may come as form fields or query parameters
        (form wins); defaults: the model's score threshold, all classes, per-class NMS."""
        t0 = time.perf_counter()
        threshold = _first(score_threshold, score_threshold_query, cfg.test_cls_threshold)
        options = DetectOptions(
            score_threshold=float(threshold),
            classes=parse_classes(_first(classes, classes_query, None), class_names),
            class_agnostic=bool(_first(class_agnostic, class_agnostic_query, False)),
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
            model=model_name,
            image=ImageSize(width=int(image.shape[1]), height=int(image.shape[0])),
            boxes=d.boxes.double().tolist(),
            scores=d.scores.double().tolist(),
            labels=labels,
            names=[class_names[i] for i in labels],
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

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 while the batching worker runs (or has not been needed yet), else 503."""
        ok = batcher.healthy
        body = {
            "status": "ok" if ok else "unavailable",
            "model": model_name,
            "device": device,
            "queued": batcher.pending,
            "batches": batcher.batches,
            "requests": batcher.requests,
            "failed_batches": batcher.failures,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        """The served model: name, class names (index = label id), config summary, serving limits."""
        return {
            "models": [
                {
                    "name": model_name,
                    "device": device,
                    "classes": class_names,
                    "config": config_summary(cfg),
                    "serving": {
                        "max_batch": max_batch,
                        "max_wait_ms": max_wait_ms,
                        "max_upload_mb": max_upload_mb,
                    },
                }
            ]
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Validation errors without the raw input (which may be a whole upload)."""
    return [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]


# --------------------------------------------------------------------------------------------------
# Loading and running.


def load_serving_model(
    *,
    model_name: str | None,
    weights: str | Path | None,
    device: str | None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ATSS, ATSSConfig, str]:
    """``(model on device, inference config, name)`` from a zoo name and/or a weights file.

    ``--model`` alone loads the zoo's pretrained weights; ``--weights`` alone needs an atssdet
    ``.safetensors`` (it carries its config). ``overrides`` may change only ``test_*`` settings.
    """
    from atssdet.config import with_overrides
    from atssdet.zoo import load_model

    if model_name is None and weights is None:
        raise ValueError("give --model NAME, --weights FILE, or both")
    overrides = overrides or {}
    bad = sorted(k for k in overrides if not k.startswith("test_"))
    if bad:
        raise ValueError(f"serve --set changes inference settings (test_*) only, not {', '.join(bad)}")
    model = load_model(model_name=model_name, weights=weights)
    name = model_name if model_name is not None else Path(str(weights)).name.split(".")[0]
    cfg = with_overrides(model.cfg, overrides) if overrides else model.cfg
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(dev).eval(), cfg, name


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0 = a free port, read it back with getsockname)."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(2048)
    return sock


def run_server(app: FastAPI, *, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted; prints the URL (with the real port) first."""
    import uvicorn

    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"atssdet serve: listening on http://{shown}:{bound_port}/ (API docs /docs)", flush=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = [
    "BatchResult",
    "DetectOptions",
    "DynamicBatcher",
    "create_app",
    "decode_upload",
    "load_serving_model",
    "parse_classes",
    "run_server",
]
