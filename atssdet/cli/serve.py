"""``atssdet serve``: the HTTP API and browser page."""

from __future__ import annotations

import argparse

from atssdet.cli.common import (
    SubParsers,
    add_command,
    add_device_flag,
    add_model_flags,
    add_set_flag,
    given,
    overrides,
)


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "serve",
        help="serve a model over HTTP (JSON API + browser page)",
        description="Serve a detector with FastAPI + uvicorn: POST /v1/detect (multipart image upload), "
        "GET /healthz, GET /v1/models, GET / (browser page), /openapi.json and /docs. Concurrent requests "
        "are batched on the device. See docs/serving.md.",
    )
    add_model_flags(
        p,
        model_help="zoo model (alone: its pretrained weights)",
        weights_help="checkpoint (.pkl/.safetensors/.pt); without --model an atssdet .safetensors",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s; 0 = any free port)")
    p.add_argument("--max-batch", type=int, help="most requests run together (default 8)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits to fill (default 10 ms)")
    p.add_argument("--max-upload-mb", type=float, help="request body limit (default 20 MB)")
    add_device_flag(p, "torch device (default cuda if available, else cpu)")
    add_set_flag(p, "inference setting, e.g. --set test_image_short_size=512 (test_* fields only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from atssdet.serve import create_app, run_server, serving_detector
    except ImportError as exc:
        raise ValueError(f"serving needs the 'serve' extra (pip install 'atssdet[serve]'): {exc}") from exc

    if getattr(args, "max_batch", 1) < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    detector, name = serving_detector(
        model_name=args.model, weights=args.weights, device=args.device, overrides=overrides(args)
    )
    app = create_app(detector, model_name=name, **given(args, "max_batch", "max_wait_ms", "max_upload_mb"))
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
