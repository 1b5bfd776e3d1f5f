"""Request guard: Host header, bearer token and body size, checked before any route runs.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one pipes every response
through an extra task and memory stream, which costs streamed answers milliseconds of TTFT.
"""

from __future__ import annotations

import secrets

from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slm_agent.errors import AuthenticationError, ForbiddenError, RequestTooLargeError, SlmAgentError
from slm_agent.runtime.config import Settings
from slm_agent.runtime.http.errors import error_response

PUBLIC_PATHS = frozenset({"/healthz"})


class Guard:
    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.token = settings.token.get_secret_value().encode() if settings.token else None
        self.max_request_bytes = settings.max_request_bytes
        # With a token, the token is the defence; without one, a browser page on another site
        # could reach a loopback daemon through a rebound DNS name: only loopback Hosts pass.
        hosts = {h.lower().strip("[]") for h in settings.allowed_hosts}
        self.allowed_hosts = None if self.token is not None or "*" in hosts else frozenset(hosts)
        # CORS sits between the Host check and the token check: a browser's preflight carries no token.
        self._guarded = _Guarded(app, self)
        self._inner: ASGIApp = (
            CORSMiddleware(
                self._guarded,
                allow_origins=settings.cors_origins,
                allow_methods=["*"],
                allow_headers=["*"],
                expose_headers=["X-SLM-Trace-Id", "Retry-After"],
            )
            if settings.cors_origins
            else self._guarded
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.allowed_hosts is not None:
            problem = self._host_problem(scope)
            if problem is not None:
                await error_response(problem)(scope, receive, send)
                return
        await self._inner(scope, receive, send)

    def _host_problem(self, scope: Scope) -> SlmAgentError | None:
        assert self.allowed_hosts is not None
        host = dict(scope["headers"]).get(b"host")
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return None
        name = _host_name(host.decode("latin-1"))
        if name in self.allowed_hosts:
            return None
        return ForbiddenError(
            f"Host {name!r} is not allowed: this daemon has no token, so it answers only "
            f"{', '.join(sorted(self.allowed_hosts))}; add the name to allowed_hosts or set a token",
            code="host_not_allowed",
        )


class _Guarded:
    """Token and body size, then the app, with the body counted as it streams in."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = self._check(scope)
        if problem is not None:
            await error_response(problem, close=problem.status_code == 413)(scope, receive, send)
            return
        await _BodyLimit(self.app, self.guard.max_request_bytes)(scope, receive, send)

    def _check(self, scope: Scope) -> SlmAgentError | None:
        headers = dict(scope["headers"])
        token = self.guard.token
        if token is not None and scope["path"] not in PUBLIC_PATHS:
            # RFC 7235: the scheme name is case-insensitive ("bearer", "BEARER").
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(given.strip(), token):
                return AuthenticationError(
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
                )
        # The fast path: a declared length over the limit is refused before a byte is read.
        length = headers.get(b"content-length", b"")
        limit = self.guard.max_request_bytes
        if length.isdigit() and int(length) > limit:
            return RequestTooLargeError(f"the request body is {int(length)} bytes; the limit is {limit}")
        return None


class _BodyLimit:
    """One request: counts body bytes as they arrive (a chunked body declares no length) and
    answers 413 the moment the count passes the limit, without holding the body.

    The app is then told the client went away, so it stops reading, and whatever it tries to send
    afterwards is dropped: the client already has its answer.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.received = 0
        self.started = False
        self.refused = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counted_receive() -> Message:
            if self.refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            self.received += len(message.get("body", b""))
            if self.received <= self.limit or self.started:
                return message
            self.refused = True
            problem = RequestTooLargeError(
                f"the request body passed {self.limit} bytes, the limit; send less"
            )
            # Closing the connection spares reading the rest of a body nobody will use.
            await error_response(problem, close=True)(scope, receive, send)
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            if self.refused:
                return
            if message["type"] == "http.response.start":
                self.started = True
            await send(message)

        await self.app(scope, counted_receive, tracked_send)


def _host_name(host: str) -> str:
    """``localhost:8765`` -> ``localhost``, ``[::1]:8765`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
