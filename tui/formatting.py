"""What the screens show, computed without any widget: number formats, plot series, table rows."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from slm_agent.runtime.store.queries import Stats, TaskTraffic, TraceSummary
from slm_agent.tui.sources import TaskInfo

METRICS = (
    "requests_per_s",
    "tokens_per_s",
    "latency_p50",
    "latency_p95",
    "errors",
    "local_share",
    "cost_saved",
)


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.{digits}f}{unit}"
    return f"{value:.{digits}f}" if isinstance(value, float) and not value.is_integer() else f"{int(value)}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f}%"


def usd(value: float | None) -> str:
    if value is None:
        return "–"
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def clock(iso: str | None) -> str:
    """Local wall-clock time of a stored UTC timestamp (date added when not today)."""
    if not iso:
        return "–"
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return dt.strftime("%m-%d %H:%M:%S")


def series(stats: Stats, metric: str) -> list[float]:
    """One value per bucket; rates are per second of bucket, missing latencies read as 0."""
    bs = stats.bucket_s
    out: list[float] = []
    for b in stats.buckets:
        if metric == "requests_per_s":
            out.append(b.requests / bs)
        elif metric == "tokens_per_s":
            out.append(b.completion_tokens / bs)
        elif metric == "latency_p50":
            out.append(b.latency_ms_p50 or 0.0)
        elif metric == "latency_p95":
            out.append(b.latency_ms_p95 or 0.0)
        elif metric == "errors":
            out.append(float(b.errors))
        elif metric == "local_share":
            out.append(b.local / b.requests if b.requests else 0.0)
        elif metric == "cost_saved":
            tokens = b.prompt_tokens + b.completion_tokens if b.requests else 0
            out.append(tokens * (b.local / b.requests if b.requests else 0) * stats.price_per_mtok / 1e6)
        else:
            raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    return out


def route_label(route: str, reason: str | None) -> str:
    return f"{route} · {reason}" if reason else route


def bar(share: float, width: int = 20) -> str:
    full = round(max(0.0, min(1.0, share)) * width)
    return "█" * full + "░" * (width - full)


def trace_row(t: TraceSummary) -> tuple[str, ...]:
    tokens = (t.prompt_tokens or 0) + (t.completion_tokens or 0)
    model = t.adapter or t.model or "–"
    status = str(t.status) if t.status < 400 else f"[b red]{t.status}[/]"
    return (
        clock(t.created_at),
        t.task or "–",
        route_label(t.route, t.route_reason),
        model,
        ms(t.latency_ms),
        str(tokens) if tokens else "–",
        status,
    )


class TaskRow(BaseModel):
    name: str
    adapter: str | None
    routing: str | None
    requests: int
    local_success: float | None
    escalation: float | None
    description: str | None


def task_rows(tasks: list[TaskInfo], stats: Stats | None) -> list[TaskRow]:
    """Declared tasks joined with their traffic; tasks seen only in traces are listed too."""
    traffic: dict[str | None, TaskTraffic] = {t.task: t for t in (stats.tasks if stats else [])}
    rows = []
    names = [t.name for t in tasks] + sorted(n for n in traffic if n and n not in {t.name for t in tasks})
    info = {t.name: t for t in tasks}
    for name in names:
        task = info.get(name, TaskInfo(name=name))
        tr = traffic.get(name)
        rows.append(
            TaskRow(
                name=name,
                adapter=task.adapter,
                routing=task.routing,
                requests=tr.requests if tr else 0,
                local_success=tr.local_success_rate if tr else None,
                escalation=tr.escalation_rate if tr else None,
                description=task.description,
            )
        )
    return rows
