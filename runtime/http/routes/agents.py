"""HTTP routes of agent runs: start one, read it, follow its spans as server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from slm_agent.contracts.api import RunStarted
from slm_agent.contracts.clock import new_id
from slm_agent.runtime.agents.feed import RunFeed
from slm_agent.runtime.agents.models import AgentRun, AgentRunRequest
from slm_agent.runtime.http.deps import Caller, LoadedServices, ReadyServices
from slm_agent.runtime.http.errors import documented
from slm_agent.runtime.http.respond import sse_only
from slm_agent.runtime.store.spans import Span

router = APIRouter()


@router.post(
    "/v1/agent/runs",
    response_model=None,
    responses={
        200: {"model": AgentRun, "description": "The finished run (wait=true)"},
        202: {"model": RunStarted, "description": "The run started; follow it at events"},
    }
    | documented(400, 402, 404, 409, 413, 422, 429, 502, 503, 504),
)
async def start_run(
    body: AgentRunRequest, services: ReadyServices, ctx: Caller, wait: bool = False
) -> JSONResponse:
    """Start a run; 202 with its id and events URL, or (``?wait=true``) 200 with the finished run."""
    if wait:
        run = await services.runs.run(new_id("run"), body, ctx)
        return JSONResponse(run.model_dump(), status_code=200)
    run_id = services.runs.start(body, ctx)
    started = RunStarted(id=run_id, events=f"/v1/agent/runs/{run_id}/events")
    return JSONResponse(started.model_dump(), status_code=202)


@router.get("/v1/agent/runs/{run_id}", responses=documented(404, 503))
async def get_run(run_id: str, services: LoadedServices) -> AgentRun:
    spans = services.runs.spans.run(run_id)
    root = spans[0]
    output = root.output or {}
    return AgentRun(
        id=run_id,
        status=root.status,
        goal=(root.input or {}).get("goal", ""),
        answer=output.get("answer"),
        pending_tool_calls=output.get("pending_tool_calls") or [],
        cost_usd=output.get("cost_usd") or 0.0,
        error=root.error,
        spans=spans,
    )


@router.get(
    "/v1/agent/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses=sse_only("The run's span changes (replayed from its start), then an end event")
    | documented(404, 503),
)
async def run_events(run_id: str, services: LoadedServices) -> StreamingResponse:
    """Every span change of the run from its start (late subscribers get the replay), then ``end``."""
    feed = services.runs.feeds.get(run_id)
    if feed is None:  # a run of an earlier daemon: replay what the database kept
        feed = _stored_feed(services.runs.spans.run(run_id))

    async def body() -> AsyncIterator[bytes]:
        async for kind, data in feed.follow():
            yield f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
        yield b"event: end\ndata: {}\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _stored_feed(spans: list[Span]) -> RunFeed:
    feed = RunFeed()
    for span in spans:
        feed.push("span", span.model_dump())
    feed.done = True
    return feed
