"""The monitor's routes: `GET /v1/stats`, `/v1/traces`, `/v1/traces/{id}`, `/v1/runs`, `/v1/runs/{id}`
and the live feed `/v1/events` (server-sent events).

Thin: each read runs runtime/store/queries.py's SQL on the trace store's read-only connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from slm_agent.runtime.http.deps import StartedServices
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


@router.get("/v1/stats", response_model=Stats)
def get_stats(
    services: StartedServices,
    window: Window = "5m",
    price_per_mtok: float = Query(DEFAULT_PRICE_PER_MTOK, ge=0, description="Remote USD per 1M tokens."),
    end: datetime | None = Query(None, description="Window end (default now); for reproducible views."),
) -> Stats:
    return query_stats(services.traces.reader.conn, window, end=end, price_per_mtok=price_per_mtok)


@router.get("/v1/traces", response_model=TracePage)
def get_traces(
    services: StartedServices,
    limit: int = Query(100, ge=1, le=500),
    before_seq: int | None = None,
    task: str | None = None,
    route: str | None = None,
    errors: bool = False,
    q: str | None = None,
) -> TracePage:
    f = TraceFilter(limit=limit, before_seq=before_seq, task=task, route=route, errors=errors, q=q)
    return query_traces(services.traces.reader.conn, f)


@router.get("/v1/traces/{trace_id}", response_model=TraceDetail)
def get_trace(services: StartedServices, trace_id: str) -> TraceDetail:
    return query_trace(services.traces.reader.conn, trace_id)


@router.get("/v1/runs", response_model=list[RunSummary])
def get_runs(services: StartedServices, limit: int = Query(100, ge=1, le=500)) -> list[RunSummary]:
    return query_runs(services.traces.reader.conn, limit)


@router.get("/v1/runs/{run_id}", response_model=RunDetail)
def get_run(services: StartedServices, run_id: str) -> RunDetail:
    return query_run(services.traces.reader.conn, run_id)


@router.get("/v1/events")
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
