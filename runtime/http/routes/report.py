"""``GET /v1/report``: the conversion report as JSON, over the trace store's read-only connections."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Query

from slm_agent.runtime.http.deps import StartedServices
from slm_agent.runtime.http.errors import documented
from slm_agent.runtime.http.routes.monitor import END_SCHEMA, window_end
from slm_agent.runtime.report import ConversionReport, build_report, parse_since, settings_price

router = APIRouter(tags=["monitor"])


@router.get("/v1/report", response_model=ConversionReport, responses=documented(400))
def get_report(
    services: StartedServices,
    since: str | None = Query(
        None, description="ISO date or time, or a duration back from now (7d, 12h); default the first trace."
    ),
    until: str | None = Query(
        None,
        description="Period end, ISO-8601 (default now); for reproducible views.",
        json_schema_extra=END_SCHEMA,
    ),
) -> ConversionReport:
    end = window_end(until, "until") or datetime.now(UTC)
    end = end if end.tzinfo else end.replace(tzinfo=UTC)
    return build_report(
        services.traces.reader.conn,
        since=parse_since(since, end) if since else None,
        until=end,
        fallback_price=settings_price(services.settings.remote),
    )
