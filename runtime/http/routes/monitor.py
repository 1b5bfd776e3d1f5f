"""The monitor's routes: `GET /v1/stats`, `/v1/traces`, `/v1/traces/{id}`, `/v1/runs`, `/v1/runs/{id}`
and the live feed `/v1/events` (server-sent events).

Thin: each read runs runtime/store/queries.py's SQL on the trace store's read-only connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from slm_agent.contracts.api import INT64_MAX
from slm_agent.errors import BadRequestError
from slm_agent.runtime.http.deps import StartedServices
from slm_agent.runtime.http.errors import documented
from slm_agent.runtime.http.respond import sse_only
from slm_agent.runtime.store.events import SSE_HEARTBEAT_S, SSE_RETRY_MS
from slm_agent.runtime.store.queries import (
    DEFAULT_PRICE_PER_MTOK,
    RunDetail,
    RunSummary,
    Stats,
    TraceDetail,
    TraceFilter,
    TracePage,
    Window,
    query_run,
    query_runs,
    query_stats,
    query_trace,
    query_traces,
)

router = APIRouter(tags=["monitor"])

# A stats window ends where traces can be: after 2000, and early enough for the date to print.
_EARLIEST_END = datetime(2000, 1, 1, tzinfo=UTC)
_LATEST_END = datetime(9999, 1, 1, tzinfo=UTC)


def window_end(end: str | None, param: str = "end") -> datetime | None:
    """``end`` as ISO-8601 text only: a bare number would be read as seconds since 1970."""
    if end is None:
        return None
    try:
        when = datetime.fromisoformat(end)
    except ValueError:
        raise BadRequestError(
            f"{param} must be an ISO-8601 time such as 2026-01-31T12:00:00Z, not {end!r}", param=param
        ) from None
    if not _EARLIEST_END <= when.astimezone(UTC) < _LATEST_END:
        raise BadRequestError(f"{param} must fall between 2000 and 9999, not {end!r}", param=param)
    return when


# The schema of an ``end`` query parameter: a date-time, which window_end also bounds to 2000-9999.
END_SCHEMA = {"format": "date-time"}


@router.get("/v1/stats", response_model=Stats, responses=documented(400))
def get_stats(
    services: StartedServices,
    window: Window = "5m",
    price_per_mtok: float = Query(
        DEFAULT_PRICE_PER_MTOK, ge=0, le=1e6, description="Remote USD per 1M tokens."
    ),
    end: str | None = Query(
        None,
        description="Window end, ISO-8601 (default now); for reproducible views.",
        json_schema_extra=END_SCHEMA,
    ),
) -> Stats:
    return query_stats(
        services.traces.reader.conn, window, end=window_end(end), price_per_mtok=price_per_mtok
    )


@router.get("/v1/traces", response_model=TracePage, responses=documented(400))
def get_traces(
    services: StartedServices,
    limit: int = Query(100, ge=1, le=500),
    before_seq: int | None = Query(None, ge=0, le=INT64_MAX, description="Traces older than this seq."),
    task: str | None = None,
    route: str | None = None,
    errors: bool = False,
    q: str | None = None,
) -> TracePage:
    f = TraceFilter(limit=limit, before_seq=before_seq, task=task, route=route, errors=errors, q=q)
    return query_traces(services.traces.reader.conn, f)


@router.get("/v1/traces/{trace_id}", response_model=TraceDetail, responses=documented(404))
def get_trace(services: StartedServices, trace_id: str) -> TraceDetail:
    return query_trace(services.traces.reader.conn, trace_id)


@router.get("/v1/runs", response_model=list[RunSummary], responses=documented(400))
def get_runs(services: StartedServices, limit: int = Query(100, ge=1, le=500)) -> list[RunSummary]:
    return query_runs(services.traces.reader.conn, limit)


@router.get("/v1/runs/{run_id}", response_model=RunDetail, responses=documented(404))
def get_run(services: StartedServices, run_id: str) -> RunDetail:
    return query_run(services.traces.reader.conn, run_id)


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses=sse_only("The daemon's live events, from Last-Event-ID on") | documented(400),
)
async def get_events(
    request: Request,
    services: StartedServices,
    last_event_id: int | None = Query(None, description="Resume after this event id."),
    last_event_id_header: str | None = Header(None, alias="Last-Event-ID"),
) -> StreamingResponse:
    """Server-sent events; a client that reconnects with Last-Event-ID misses nothing.

    The stream ends when the client goes away or the daemon closes the bus on its way out.
    """
    bus = services.events
    resume = last_event_id
    if resume is None and last_event_id_header and last_event_id_header.strip().isdigit():
        resume = int(last_event_id_header.strip())

    async def stream() -> AsyncIterator[str]:
        yield f"retry: {SSE_RETRY_MS}\n: connected\n\n"
        async with contextlib.aclosing(bus.subscribe(resume, heartbeat_s=SSE_HEARTBEAT_S)) as events:
            async for event in events:
                if await request.is_disconnected():
                    return
                if event is None:
                    yield ": heartbeat\n\n"
                    continue
                yield event.to_sse()
                await asyncio.sleep(0)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
