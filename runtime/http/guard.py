"""Request guard: bearer token and body size, checked before any route runs.

A plain ASGI middleware, not Starlette's ``BaseHTTPMiddleware``: that one pipes every response
through an extra task and memory stream, which costs streamed answers milliseconds of TTFT.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from slm_agent.errors import AuthenticationError, RequestTooLargeError, SlmAgentError
from slm_agent.runtime.http.errors import error_response

PUBLIC_PATHS = frozenset({"/healthz"})


class Guard:
    def __init__(self, app: ASGIApp, *, token: str | None, max_request_bytes: int) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self._check(scope)
            if problem is not None:
                await error_response(problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> SlmAgentError | None:
        headers = dict(scope["headers"])
        if self.token is not None and scope["path"] not in PUBLIC_PATHS:
            value = headers.get(b"authorization", b"")
            given = value[7:].strip() if value.startswith(b"Bearer ") else b""
            if not secrets.compare_digest(given, self.token):
                return AuthenticationError(
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>'"
                )
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_request_bytes:
            return RequestTooLargeError(
                f"the request body is {int(length)} bytes; the limit is {self.max_request_bytes}"
            )
        return None
