"""Loading the served model and running the app with uvicorn on a bound socket, with timeouts.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and bounds header size (h11's
``max_incomplete_event_size``), but waits for ever for headers that trickle in (slowloris): the
protocol class here closes a connection whose request headers have not all arrived
``header_timeout_s`` after its first byte (or after the connection opened). Body time is bounded
by :class:`~atssdet.serve.checks.BodyLimit`.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from atssdet.detector import Detector
from atssdet.serve.access import is_loopback

MAX_HEADER_BYTES = 16 * 1024


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


def run_server(
    app: FastAPI,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    header_timeout_s: float = 10.0,
    keep_alive_s: float = 5.0,
    max_connections: int | None = 256,
) -> None:
    """Serve ``app`` with uvicorn until interrupted; prints the URL (with the real port) first.

    Refuses (ValueError) an app without an access policy, and a non-loopback ``host`` whose policy
    has no token. ``max_connections``: uvicorn's ``limit_concurrency`` (more get 503).
    """
    import uvicorn

    access = getattr(app.state, "access", None)
    if access is None:
        raise ValueError("run_server needs an app built with access=AccessPolicy.for_address(host, ...)")
    if access.token is None and not is_loopback(host):
        raise ValueError(f"--host {host}: serving a non-loopback address needs a token (--token)")
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    docs = "API docs /docs" if app.docs_url else "API schema /openapi.json"
    print(f"atssdet serve: listening on http://{shown}:{bound_port}/ ({docs})", flush=True)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=max(1, round(keep_alive_s)),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        http=header_timeout_protocol(header_timeout_s),
        limit_concurrency=max_connections,
    )
    uvicorn.Server(config).run(sockets=[sock])


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take over ``timeout_s``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers took over %g s", timeout_s)
                self.transport.close()

    return HeaderTimeoutH11
