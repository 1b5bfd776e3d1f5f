"""Routing's outcome as an HTTP response: JSON, an SSE stream or a bare status, with the route
headers every answer carries."""

from __future__ import annotations

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

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
