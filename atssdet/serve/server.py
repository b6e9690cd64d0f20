"""Loading the served model and running the app with uvicorn on a bound socket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atssdet.detector import Detector


def serving_detector(
    *,
    model_name: str | None,
    weights: str | Path | None,
    device: str | None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Detector, str]:
    """``(detector, name)`` from a zoo name and/or a weights file, through :func:`atssdet.loader.load_runner`.

    ``--model`` alone loads the zoo's pretrained weights; ``--weights`` alone needs a file that
    carries its config (an atssdet ``.safetensors`` or ``.onnx``). ``overrides`` may change only
    ``test_*`` settings.
    """
    from atssdet.loader import load_runner

    if model_name is None and weights is None:
        raise ValueError("give --model NAME, --weights FILE, or both")
    overrides = overrides or {}
    bad = sorted(k for k in overrides if not k.startswith("test_"))
    if bad:
        raise ValueError(f"serve --set changes inference settings (test_*) only, not {', '.join(bad)}")
    detector = Detector(load_runner(model_name, weights=weights, overrides=overrides or None, device=device))
    name = model_name if model_name is not None else Path(str(weights)).name.split(".")[0]
    return detector, name


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
