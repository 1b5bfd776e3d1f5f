"""The monitor's read side: SQL aggregates and keyset pages over the trace database.

The query functions take a read-only connection, so the TUI's ``--db`` mode runs exactly the SQL the
daemon serves (runtime/http/routes/monitor.py), and the daemon's own reads never wait on the trace store's
writer lock.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import iso
from slm_agent.contracts.records import FeedbackRecord, TraceRecord, decode_row
from slm_agent.errors import NotFoundError
from slm_agent.runtime.store.spans import SPAN_JSON_COLUMNS, Span, read_run

Window = Literal["5m", "1h", "24h"]
# window -> (length, bucket width) in seconds: 60, 60 and 96 points, enough for a terminal-wide plot.
WINDOWS: dict[str, tuple[int, int]] = {"5m": (300, 5), "1h": (3600, 60), "24h": (86400, 900)}
DEFAULT_PRICE_PER_MTOK = 5.0  # USD per million tokens of a typical large remote model, blended in/out


# -- boundary types ----------------------------------------------------------------------------------
class Bucket(BaseModel):
    start: str
    requests: int = 0
    errors: int = 0
    local: int = 0
    remote: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None


class RouteShare(BaseModel):
    route: str
    reason: str | None
    count: int
    share: float


class TaskTraffic(BaseModel):
    task: str | None
    requests: int
    local: int
    local_ok: int = Field(description="Answered locally without an error.")
    escalated: int
    errors: int

    @property
    def local_success_rate(self) -> float | None:
        return self.local_ok / self.local if self.local else None

    @property
    def escalation_rate(self) -> float | None:
        return self.escalated / self.requests if self.requests else None


class Stats(BaseModel):
    window: str
    bucket_s: int
    start: str
    end: str
    buckets: list[Bucket]
    requests: int
    errors: int
    local: int
    remote: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    routes: list[RouteShare]
    tasks: list[TaskTraffic]
    remote_cost_usd: float = Field(description="What escalated requests actually cost.")
    price_per_mtok: float
    cost_saved_usd: float = Field(
        description="Local tokens priced at price_per_mtok: the all-remote bill avoided."
    )

    @property
    def requests_per_s(self) -> float:
        return self.requests / WINDOWS[self.window][0]

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / WINDOWS[self.window][0]

    @property
    def local_share(self) -> float | None:
        return self.local / self.requests if self.requests else None


class TraceSummary(BaseModel):
    """One row of the traces table: no prompts or outputs, so a page stays small."""

    seq: int
    id: str
    created_at: str
    endpoint: str
    task: str | None = None
    route: str
    route_reason: str | None = None
    model: str | None = None
    adapter: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int
    error: str | None = None


class TracePage(BaseModel):
    items: list[TraceSummary]
    next_before_seq: int | None = Field(
        description="Pass as before_seq for the next (older) page; null at the end."
    )


class TraceDetail(BaseModel):
    trace: TraceRecord
    feedback: list[FeedbackRecord]


class RunSummary(Span):
    steps: int = 0


class RunDetail(BaseModel):
    run: RunSummary
    spans: list[Span]


class TraceFilter(BaseModel):
    limit: int = Field(100, ge=1, le=500)
    before_seq: int | None = None
    task: str | None = None
    route: str | None = None
    errors: bool = False
    q: str | None = None


# -- read-only database ------------------------------------------------------------------------------
class ReadOnlyDb:
    """Read-only SQLite connections (URI ``mode=ro``), one per thread, for queries run off the event loop."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(f"no trace database at {self.path}: start slm-agentd once or pass --db PATH")
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=5)
            conn.row_factory = sqlite3.Row
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()


# -- queries -----------------------------------------------------------------------------------------
_STATS_SQL = """
WITH w AS (
    SELECT CAST((julianday(created_at) - :j0) * 86400.0 / :bs AS INTEGER) AS b,
           route, status, prompt_tokens, completion_tokens, latency_ms
    FROM traces WHERE created_at >= :start AND created_at < :end
),
ranked AS (
    SELECT b, latency_ms,
           row_number() OVER (PARTITION BY b ORDER BY latency_ms) AS rn,
           count(*) OVER (PARTITION BY b) AS n
    FROM w WHERE latency_ms IS NOT NULL
),
overall AS (
    SELECT latency_ms, row_number() OVER (ORDER BY latency_ms) AS rn, count(*) OVER () AS n
    FROM w WHERE latency_ms IS NOT NULL
)
SELECT b, count(*), sum(status >= 400), sum(route = 'local'), sum(route != 'local'),
       coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0),
       (SELECT max(latency_ms) FROM ranked r WHERE r.b = w.b AND r.rn <= (r.n * 50 + 99) / 100),
       (SELECT max(latency_ms) FROM ranked r WHERE r.b = w.b AND r.rn <= (r.n * 95 + 99) / 100)
FROM w GROUP BY b
UNION ALL
SELECT -1, 0, 0, 0, 0, 0, 0,
       (SELECT max(latency_ms) FROM overall WHERE rn <= (n * 50 + 99) / 100),
       (SELECT max(latency_ms) FROM overall WHERE rn <= (n * 95 + 99) / 100)
"""


def query_stats(
    conn: sqlite3.Connection,
    window: str = "5m",
    *,
    end: datetime | None = None,
    price_per_mtok: float = DEFAULT_PRICE_PER_MTOK,
) -> Stats:
    """Per-bucket aggregates over the window ending at ``end`` (now), all computed in SQL.

    Buckets are aligned to multiples of their width so a 1 s refresh redraws the same buckets
    instead of sliding every point a little.
    """
    length, bucket_s = WINDOWS[window]
    now = (end or datetime.now(UTC)).timestamp()
    end_epoch = math.ceil(now / bucket_s) * bucket_s
    start_epoch = end_epoch - length
    start, end_s = iso(start_epoch), iso(end_epoch)
    j0 = start_epoch / 86400.0 + 2440587.5  # julian day of the window start
    params = {"j0": j0, "bs": bucket_s, "start": start, "end": end_s}
    n = length // bucket_s
    buckets = [Bucket(start=iso(start_epoch + i * bucket_s)) for i in range(n)]
    p50 = p95 = None
    for b, count, errors, local, remote, ptok, ctok, bp50, bp95 in conn.execute(_STATS_SQL, params):
        if b == -1:
            p50, p95 = bp50, bp95
        elif 0 <= b < n:
            buckets[b] = buckets[b].model_copy(
                update={
                    "requests": count,
                    "errors": errors or 0,
                    "local": local or 0,
                    "remote": remote or 0,
                    "prompt_tokens": ptok,
                    "completion_tokens": ctok,
                    "latency_ms_p50": bp50,
                    "latency_ms_p95": bp95,
                }
            )
    window_where = "created_at >= :start AND created_at < :end"
    routes_rows = conn.execute(
        f"SELECT route, route_reason, count(*) FROM traces WHERE {window_where} "
        "GROUP BY route, route_reason ORDER BY count(*) DESC",
        params,
    ).fetchall()
    task_rows = conn.execute(
        f"""SELECT task, count(*), sum(route = 'local'), sum(route = 'local' AND status < 400),
                   sum(route != 'local'), sum(status >= 400)
            FROM traces WHERE {window_where} GROUP BY task ORDER BY count(*) DESC""",
        params,
    ).fetchall()
    local_tokens, remote_cost = conn.execute(
        f"""SELECT coalesce(sum(CASE WHEN route = 'local'
                     THEN coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0) END), 0),
                   coalesce(sum(cost_usd), 0)
            FROM traces WHERE {window_where}""",
        params,
    ).fetchone()
    total = sum(b.requests for b in buckets)
    return Stats(
        window=window,
        bucket_s=bucket_s,
        start=start,
        end=end_s,
        buckets=buckets,
        requests=total,
        errors=sum(b.errors for b in buckets),
        local=sum(b.local for b in buckets),
        remote=sum(b.remote for b in buckets),
        prompt_tokens=sum(b.prompt_tokens for b in buckets),
        completion_tokens=sum(b.completion_tokens for b in buckets),
        latency_ms_p50=p50,
        latency_ms_p95=p95,
        routes=[
            RouteShare(route=r, reason=reason, count=c, share=c / total if total else 0.0)
            for r, reason, c in routes_rows
        ],
        tasks=[
            TaskTraffic(
                task=t, requests=c, local=lo or 0, local_ok=ok or 0, escalated=esc or 0, errors=e or 0
            )
            for t, c, lo, ok, esc, e in task_rows
        ],
        remote_cost_usd=float(remote_cost),
        price_per_mtok=price_per_mtok,
        cost_saved_usd=local_tokens * price_per_mtok / 1_000_000,
    )


_SUMMARY_COLUMNS = ", ".join(TraceSummary.model_fields)


def query_traces(conn: sqlite3.Connection, f: TraceFilter) -> TracePage:
    """Newest first, keyset-paged by seq: each page is one index range scan, whatever the table size."""
    where: list[str] = ["1=1"]
    params: list[int | str] = []
    if f.before_seq is not None:
        where.append("seq < ?")
        params.append(f.before_seq)
    if f.task:
        where.append("task = ?")
        params.append(f.task)
    if f.route:
        where.append("route = ?")
        params.append(f.route)
    if f.errors:
        where.append("status >= 400")
    if f.q:
        escaped = f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        like = f"%{escaped}%"
        fields = ("id", "task", "model", "adapter", "route_reason", "error", "response", "request")
        where.append("(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in fields) + ")")
        params.extend([like] * len(fields))
    rows = conn.execute(
        f"SELECT {_SUMMARY_COLUMNS} FROM traces WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?",
        [*params, f.limit + 1],
    ).fetchall()
    items = [TraceSummary.model_validate(dict(r)) for r in rows[: f.limit]]
    more = len(rows) > f.limit
    return TracePage(items=items, next_before_seq=items[-1].seq if more and items else None)


def query_trace(conn: sqlite3.Connection, trace_id: str) -> TraceDetail:
    row = conn.execute("SELECT * FROM traces WHERE id = ?", [trace_id]).fetchone()
    if row is None:
        raise NotFoundError(f"no trace with id {trace_id!r}")
    feedback = conn.execute("SELECT * FROM feedback WHERE trace_id = ? ORDER BY seq", [trace_id]).fetchall()
    return TraceDetail(
        trace=TraceRecord.model_validate(decode_row(dict(row), lenient=True)),
        feedback=[FeedbackRecord.model_validate(dict(r)) for r in feedback],
    )


def query_traces_after(conn: sqlite3.Connection, after_seq: int, limit: int = 500) -> list[TraceSummary]:
    """Oldest first: what an event stream replays to a client that fell behind the ring buffer."""
    rows = conn.execute(
        f"SELECT {_SUMMARY_COLUMNS} FROM traces WHERE seq > ? ORDER BY seq LIMIT ?", [after_seq, limit]
    ).fetchall()
    return [TraceSummary.model_validate(dict(r)) for r in rows]


def query_runs(conn: sqlite3.Connection, limit: int = 100) -> list[RunSummary]:
    rows = conn.execute(
        """SELECT s.*, (SELECT count(*) FROM spans c WHERE c.run_id = s.run_id) - 1 AS steps
           FROM spans s WHERE s.parent_id IS NULL ORDER BY s.seq DESC LIMIT ?""",
        [limit],
    ).fetchall()
    return [RunSummary.model_validate(decode_row(dict(r), SPAN_JSON_COLUMNS, lenient=True)) for r in rows]


def query_run(conn: sqlite3.Connection, run_id: str) -> RunDetail:
    spans = read_run(conn, run_id)
    roots = [s for s in spans if s.parent_id is None]
    if not roots:
        raise NotFoundError(f"no agent run with id {run_id!r}")
    run = RunSummary(**roots[0].model_dump(), steps=len(spans) - 1)
    return RunDetail(run=run, spans=spans)


def max_seq(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM traces").fetchone()[0])
