"""Who may talk to the server: the Host header, the Origin header and a bearer token.

Three checks, in this order, before any body is read (:class:`AccessGuard`, an ASGI middleware):

* **Host** (DNS rebinding): a web page on ``attacker.example`` whose name is made to resolve to
  127.0.0.1 reaches a loopback server with ``Host: attacker.example``; only the names of the bound
  address (and ``--allowed-host``) are served, anything else gets 400;
* **Origin** (cross-site requests): a browser sends ``Origin`` with cross-origin requests, and a
  "simple" POST (a form upload) is sent without a CORS preflight, so leaving out the CORS headers
  does not stop it from running; a request whose Origin is neither the server's own nor in
  ``--cors-origin`` gets 403;
* **token**: with ``--token`` (required when binding a non-loopback address) every route but the page
  (``/``) and ``/healthz`` needs ``Authorization: Bearer TOKEN``, else 401.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

TOKEN_ENV = "ATSSDET_TOKEN"
LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS: frozenset[str] = frozenset({"", "0.0.0.0", "::"})
# Reachable without the token: the page carries no data (it asks for the token itself) and
# health probes rarely carry credentials.
OPEN_PATHS: frozenset[str] = frozenset({"/", "/healthz"})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header or URL authority: ``"[::1]:8000"`` -> ``"::1"``, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        header = header.split(":", 1)[0]
    return header.rstrip(".")


@dataclass(frozen=True)
class AccessPolicy:
    """``allowed_hosts``: names the Host header may carry (None: any); ``token``: required bearer
    token (None: none); ``cors_origins``: other origins (``https://app.example``) that may call the API."""

    allowed_hosts: tuple[str, ...] | None = None
    token: str | None = None
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def for_address(
        cls,
        host: str,
        *,
        allowed_hosts: Iterable[str] = (),
        token: str | None = None,
        cors_origins: Iterable[str] = (),
    ) -> AccessPolicy:
        """The policy for a server bound to ``host``: its names plus ``allowed_hosts`` (a wildcard
        bind without ``allowed_hosts`` checks no Host); ``token`` is required off loopback."""
        extra = tuple(host_name(h) for h in allowed_hosts if h.strip())
        if host in WILDCARD_HOSTS:
            names: tuple[str, ...] | None = (*extra, *LOOPBACK_NAMES) if extra else None
        else:
            names = (host_name(host), *extra, *(LOOPBACK_NAMES if is_loopback(host) else ()))
        if token is not None and not token.strip():
            raise ValueError("--token: the token is empty")
        if token is None and not is_loopback(host):
            raise ValueError(
                f"--host {host or '(all interfaces)'}: not a loopback address, so anyone who can reach "
                f"it could use the server: give --token TOKEN (or set ${TOKEN_ENV}); clients then send "
                "'Authorization: Bearer TOKEN'"
            )
        origins = tuple(o.strip().rstrip("/") for o in cors_origins if o.strip())
        return cls(
            allowed_hosts=None if names is None else tuple(dict.fromkeys(names)),
            token=token,
            cors_origins=origins,
        )


class AccessGuard:
    """ASGI middleware enforcing an :class:`AccessPolicy` (see the module docstring); JSON refusals."""

    def __init__(self, app: ASGIApp, *, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        allowed = self.policy.allowed_hosts
        if allowed is not None and host_name(host) not in allowed:
            shown = host or "(missing)"
            return JSONResponse(
                {
                    "error": f"Host header {shown!r} is not a name of this server (allowed: "
                    f"{', '.join(allowed)}); start it with --allowed-host NAME to serve that name"
                },
                status_code=400,
            )
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return JSONResponse(
                {
                    "error": f"Origin {origin!r} may not call this server (cross-origin requests are off; "
                    "start it with --cors-origin ORIGIN to allow one)"
                },
                status_code=403,
            )
        token = self.policy.token
        if token is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                problem = "missing" if not given else "wrong"
                return JSONResponse(
                    {"error": f"{scope['path']}: {problem} token: send 'Authorization: Bearer TOKEN'"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/")
        if origin in self.policy.cors_origins:
            return True
        _, sep, authority = origin.partition("://")
        return bool(sep) and bool(host) and authority.lower() == host.strip().lower()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
