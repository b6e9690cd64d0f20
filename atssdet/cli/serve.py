"""``atssdet serve``: the HTTP API and browser page."""

from __future__ import annotations

import argparse
import os

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
        "GET /healthz, GET /v1/models, GET / (browser page), /openapi.json (and /docs with --docs). "
        "Concurrent requests are batched on the device. Only the bound address's names are served "
        "(DNS rebinding), cross-origin calls are refused unless --cors-origin, and a non-loopback "
        "--host needs --token. See docs/serving.md.",
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
    p.add_argument(
        "--max-inflight-megapixels",
        type=float,
        help="decoded pixels of all requests in flight, from their headers; more get 503 + Retry-After "
        "(default 200, ~600 MB of images)",
    )
    p.add_argument(
        "--body-timeout", dest="body_timeout_s", type=float, help="seconds for a body to arrive (default 60)"
    )
    p.add_argument(
        "--header-timeout",
        dest="header_timeout_s",
        type=float,
        help="seconds for request headers (default 10)",
    )
    p.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve requests whose Host header is NAME (a DNS name of this machine); repeatable",
    )
    p.add_argument(
        "--token",
        default=None,
        help="require 'Authorization: Bearer TOKEN' (default $ATSSDET_TOKEN; required off loopback)",
    )
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://app.example) call the API; repeatable (default: none)",
    )
    p.add_argument(
        "--docs", action="store_true", help="serve FastAPI's /docs page (it loads Swagger UI from a CDN)"
    )
    add_device_flag(p, "torch device (default cuda if available, else cpu)")
    add_set_flag(p, "inference setting, e.g. --set test_image_short_size=512 (test_* fields only)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from atssdet.serve import AccessPolicy, create_app, run_server, serving_detector
        from atssdet.serve.access import TOKEN_ENV
    except ImportError as exc:
        raise ValueError(f"serving needs the 'serve' extra (pip install 'atssdet[serve]'): {exc}") from exc

    if getattr(args, "max_batch", 1) < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    # Checked before the model loads: a refused address costs nothing.
    access = AccessPolicy.for_address(
        args.host,
        allowed_hosts=args.allowed_hosts,
        token=args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None,
        cors_origins=args.cors_origins,
    )
    detector, name = serving_detector(
        model_name=args.model, weights=args.weights, device=args.device, overrides=overrides(args)
    )
    limits = given(
        args, "max_batch", "max_wait_ms", "max_upload_mb", "max_inflight_megapixels", "body_timeout_s", "docs"
    )
    app = create_app(detector, model_name=name, access=access, **limits)
    run_server(
        app, host=args.host, port=args.port, log_level=args.log_level, **given(args, "header_timeout_s")
    )
    return 0
