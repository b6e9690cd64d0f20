"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from atssdet.zoo import ZOO


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a MegEngine .pkl checkpoint to safetensors",
        description="Read a MegEngine checkpoint with a restricted unpickler (no code runs), check every "
        "key and shape against the model, and write an atssdet .safetensors file.",
    )
    p.add_argument("src", help="MegEngine .pkl (or .pkl.gz) checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model the checkpoint belongs to")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from atssdet.convert import convert_checkpoint
    from atssdet.zoo import get_entry

    out = convert_checkpoint(args.src, args.dst, get_entry(args.model).config)
    print(f"wrote {out}")
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API + browser page)",
        description="Serve a detector with FastAPI + uvicorn: POST /v1/detect (multipart image upload), "
        "GET /healthz, GET /v1/models, GET / (browser page), /openapi.json and /docs. Concurrent requests "
        "are batched on the device. See docs/serving.md.",
    )
    p.add_argument("--model", choices=sorted(ZOO), help="zoo model (alone: its pretrained weights)")
    p.add_argument(
        "--weights", help="checkpoint (.pkl/.safetensors/.pt); without --model an atssdet .safetensors"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together (default 8)")
    p.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10 ms)"
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit (default 20 MB)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference setting, e.g. --set test_image_short_size=512 (test_* fields only)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from atssdet.serve import create_app, load_serving_model, run_server
    except ImportError as exc:
        raise ValueError(f"serving needs the 'serve' extra (pip install 'atssdet[serve]'): {exc}") from exc
    from atssdet.config import parse_set_option

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    overrides = dict(parse_set_option(item) for item in args.set)
    model, cfg, name = load_serving_model(
        model_name=args.model, weights=args.weights, device=args.device, overrides=overrides
    )
    app = create_app(
        model,
        model_name=name,
        cfg=cfg,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
    )
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atssdet.convert import CheckpointError

    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"atssdet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
