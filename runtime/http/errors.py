"""The one place where errors become HTTP responses, in OpenAI's error body shape."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slm_agent.contracts.api import ErrorResponse, error_body
from slm_agent.errors import AuthenticationError, QueueFullError, SlmAgentError, UnavailableError

log = logging.getLogger(__name__)


def error_response(exc: SlmAgentError, *, close: bool = False) -> JSONResponse:
    """``close``: ask the server to drop the connection after answering (a body left unread)."""
    headers = {}
    retry = (
        getattr(exc, "retry_after_s", None) if isinstance(exc, QueueFullError | UnavailableError) else None
    )
    if retry:
        headers["Retry-After"] = str(math.ceil(retry))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"  # RFC 7235: a 401 names the scheme it wants
    if exc.trace_id:
        headers["X-SLM-Trace-Id"] = exc.trace_id
    if close:
        headers["Connection"] = "close"
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return (
            f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
            None,
        )
    # loc starts with where the value came from (body, query, path); union members add tags such
    # as "literal['none','auto']". The param is the field's own path.
    loc = [str(p) for p in first.get("loc", ())[1:] if isinstance(p, int) or "[" not in p]
    # A whole-body check (text that is not Unicode, tool_choice without tools) names its field in ctx.
    field = (first.get("ctx") or {}).get("field")
    where = ".".join(loc) or (str(field) if field else None)
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first.get('msg')}{more}", where


# What each status means on this API; every one answers with OpenAI's error body.
_MEANINGS = {
    400: "Bad request: a field, header or query parameter is wrong (the error names it)",
    401: "Missing or wrong bearer token (only when the daemon has a token)",
    402: "The remote's budget is spent",
    403: "Host not allowed (a tokenless daemon answers only loopback names)",
    404: "Unknown model, task, adapter, trace, run or response",
    409: "Conflict: the state does not allow it (a task with no adapter, a run past its limits)",
    413: "The request body, or the prompt for the context window, is too large",
    422: "The JSON schema is invalid or unsatisfiable, or the answer did not satisfy it",
    429: "The engine's queue is full; retry after Retry-After seconds",
    502: "The remote LLM failed",
    503: "The model is loading, failed to load, or the daemon is shutting down (Retry-After when known)",
    504: "The request's deadline passed",
    507: "Not enough memory to load the model or adapter",
}
# The guard answers these on every route before the route runs (401 only where a token is set).
GUARDED = (401, 403)
_ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorResponse"}
_RETRY_AFTER = {
    "description": "Seconds to wait before retrying (a 503 sends it when known)",
    "schema": {"type": "integer"},
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for the error statuses a route answers, each with the error body.

    Named as JSON content, not as ``model``: FastAPI would file a model under the route's own media
    type, and errors are JSON on /metrics and the SSE routes too."""
    declared: dict[int | str, dict[str, Any]] = {
        status: {"description": _MEANINGS[status], "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
        for status in sorted({*GUARDED, *statuses})
    }
    for status in {429, 503} & declared.keys():
        declared[status]["headers"] = {"Retry-After": _RETRY_AFTER}
    return declared


# A client that hangs up before its answer is traced as 499; nobody is left to read the response.
CLIENT_CLOSED: dict[int | str, dict[str, Any]] = {
    499: {"description": "Client closed the request (recorded in the trace; no client reads it)"}
}


def _openapi_without_422(app: FastAPI) -> None:
    """FastAPI documents validation failures as 422 with its own body; this API answers them with 400
    and OpenAI's error body (each route declares its 400), so FastAPI's 422 is dropped, and the
    error body ``documented`` refers to is added."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        fastapi_422 = "#/components/schemas/HTTPValidationError"
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                content = responses.get("422", {}).get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref") == fastapi_422:
                    del responses["422"]
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(error.pop("$defs", {}))
        components["ErrorResponse"] = error
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise it


def install(app: FastAPI) -> None:
    _openapi_without_422(app)

    @app.exception_handler(SlmAgentError)
    async def _slm(request: Request, exc: SlmAgentError) -> JSONResponse:
        if exc.status_code >= 500:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(
            error_body(message, "invalid_request_error", param, "invalid_request"), status_code=400
        )

    @app.exception_handler(UnicodeError)
    async def _not_unicode(request: Request, exc: UnicodeError) -> JSONResponse:
        # The request models name the field; this catches text that reached a body they do not
        # check (a lone surrogate cannot be encoded for the tokenizer, SQLite or the response).
        return JSONResponse(
            error_body(
                "the request holds text that is not valid Unicode (a lone surrogate); send UTF-8 text",
                "invalid_request_error",
                None,
                "invalid_unicode",
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error", None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {exc}", "server_error"), status_code=500)
