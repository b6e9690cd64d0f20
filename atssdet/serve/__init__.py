"""Serving a detector over HTTP: a JSON API with dynamic batching and a one-page browser client.

    python -m atssdet serve --model atss_res18_coco_3x_800size --port 8000

Endpoints (see ``docs/serving.md``): ``POST /v1/detect`` (multipart image upload), ``GET /healthz``,
``GET /v1/models``, ``GET /`` (the page), ``GET /openapi.json`` (and FastAPI's ``/docs`` if enabled).

Modules: :mod:`~atssdet.serve.batcher` (the worker thread that batches queued requests by their
:class:`~atssdet.options.InferenceOptions`), :mod:`~atssdet.serve.checks` (uploads, options, body
size and time, pixels in flight; every refusal an :class:`ApiError`), :mod:`~atssdet.serve.access`
(Host, Origin and token checks: :class:`AccessPolicy`), :mod:`~atssdet.serve.app` (routes and response models),
:mod:`~atssdet.serve.server` (loading the model, uvicorn). The names below are the package's API.
"""

from atssdet.serve.access import AccessPolicy
from atssdet.serve.app import create_app
from atssdet.serve.batcher import BatchResult, DynamicBatcher
from atssdet.serve.checks import ApiError, decode_upload, request_options
from atssdet.serve.server import run_server, serving_detector

__all__ = [
    "AccessPolicy",
    "ApiError",
    "BatchResult",
    "DynamicBatcher",
    "create_app",
    "decode_upload",
    "serving_detector",
    "request_options",
    "run_server",
]
