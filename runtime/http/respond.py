"""Routing's outcome as an HTTP response: JSON, an SSE stream or a bare status, with the route
headers every answer carries."""

from __future__ import annotations

from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from slm_agent.contracts.records import TraceRecord
from slm_agent.runtime.routing.outcome import Outcome


def route_headers(trace: TraceRecord) -> dict[str, str]:
    return {
        "X-SLM-Route": trace.route,
        "X-SLM-Route-Reason": trace.route_reason or "",
        "X-SLM-Trace-Id": trace.id,
    }


def respond(outcome: Outcome) -> Response:
    headers = route_headers(outcome.trace)
    if outcome.stream is not None:
        return StreamingResponse(
            outcome.stream, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    if outcome.body is None:
        return Response(status_code=outcome.status, headers=headers)
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


# One server-sent event, as a client parses it; ``data`` holds JSON (an OpenAI chunk, a span, a
# monitor event) or ``[DONE]``, whose shape differs by route and event.
SSE_CONTENT: dict[str, Any] = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "event": {"type": "string"},
                "data": {"type": "string"},
                "id": {"type": "string"},
                "retry": {"type": "integer"},
            },
        }
    }
}


def json_or_sse(model: type[BaseModel], description: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` of a route that answers ``model`` as JSON, or an SSE stream when the
    request sets ``stream``."""
    return {200: {"model": model, "description": description, "content": SSE_CONTENT}}


def sse_only(description: str) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` of a route whose 200 is a server-sent event stream and nothing else."""
    return {200: {"description": description, "content": SSE_CONTENT}}
