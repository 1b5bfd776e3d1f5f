"""Build the conversion report from the trace database, read-only, mostly in SQL.

Reads three tables of migration m003: ``traces`` (who answered, how fast, at what cost),
``task_states`` (each task's adapter and state) and ``shadow_pairs`` (local vs remote on the same
request). Takes a read-only connection (runtime/store/queries.py's ``ReadOnlyDb``), so the daemon,
the CLI and the TUI's ``--db`` mode compute the same figures.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from datetime import UTC, datetime

from slm_agent.contracts.clock import epoch, iso
from slm_agent.runtime.remote.settings import RemoteSettings
from slm_agent.runtime.report.model import Bucket, ConversionReport, Price, TaskConversion
from slm_agent.runtime.report.period import BUCKET_S, bucket_starts, granularity
from slm_agent.runtime.shadow.stats import Z_ONE_SIDED_95, wilson_bounds
from slm_agent.runtime.store.queries import DEFAULT_PRICE_PER_MTOK

_WINDOW = "created_at >= :since AND created_at < :until"
# A local answer counts only when it succeeded; a failed one was no answer at all.
_LOCAL_OK = "route = 'local' AND status < 400"

# Nearest-rank p50 (the ceil(n/2)-th smallest), as the monitor's percentiles.
_P50_SQL = f"""
WITH ranked AS (
    SELECT task, route, latency_ms,
           row_number() OVER (PARTITION BY {{by}} ORDER BY latency_ms) AS rn,
           count(*) OVER (PARTITION BY {{by}}) AS n
    FROM traces
    WHERE {_WINDOW} AND status < 400 AND latency_ms IS NOT NULL AND {{where}}
)
SELECT {{by}}, max(latency_ms) FROM ranked WHERE rn <= (n * 50 + 99) / 100 GROUP BY {{by}}
"""

# Calls per task and hour or day, in one pass; a task's totals are the sum of its buckets. Integer
# seconds (strftime '%s'), so a call on a bucket's first second never lands in the one before.
_TRAFFIC_SQL = f"""
SELECT task, (CAST(strftime('%s', created_at) AS INTEGER) - :first) / :width, count(*), sum({_LOCAL_OK}),
       coalesce(sum(CASE WHEN {_LOCAL_OK} THEN coalesce(prompt_tokens, 0) END), 0),
       coalesce(sum(CASE WHEN {_LOCAL_OK} THEN coalesce(completion_tokens, 0) END), 0)
FROM traces WHERE {_WINDOW} GROUP BY 1, 2
"""

# The remote's real price per token on each task: all its priced remote answers, whatever the
# period, since a task that went live has few remote calls left in a recent window.
_OBSERVED_PRICE_SQL = """
SELECT task, sum(cost_usd), sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0))
FROM traces
WHERE route = 'remote' AND status < 400 AND task IS NOT NULL AND cost_usd > 0
GROUP BY task
"""

# Agreement of each task's current adapter (any adapter when the task has no state yet).
_PAIRS_SQL = """
SELECT p.task, count(*), sum(p.agreed)
FROM shadow_pairs p LEFT JOIN task_states s ON s.task = p.task
WHERE p.created_at >= :since AND p.created_at < :until AND p.agreed IS NOT NULL
      AND (s.adapter IS NULL OR p.adapter IS s.adapter)
GROUP BY p.task
"""


def settings_price(remote: RemoteSettings | None) -> Price:
    """The configured provider's price (the default provider, else the first), else a typical one."""
    providers = remote.providers if remote else []
    chosen = next((p for p in providers if remote and p.name == remote.default_provider), None)
    chosen = chosen or (providers[0] if providers else None)
    if chosen and (chosen.price_per_1k_input or chosen.price_per_1k_output):
        return Price(
            input_per_mtok=chosen.price_per_1k_input * 1000,
            output_per_mtok=chosen.price_per_1k_output * 1000,
            source="settings",
        )
    return Price(
        input_per_mtok=DEFAULT_PRICE_PER_MTOK, output_per_mtok=DEFAULT_PRICE_PER_MTOK, source="default"
    )


def build_report(
    conn: sqlite3.Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    fallback_price: Price | None = None,
) -> ConversionReport:
    """Every figure of the report over [since, until); ``since`` defaults to the first trace."""
    end = until or datetime.now(UTC)
    start = since or _first_trace(conn) or end
    params: dict[str, str | int] = {"since": iso(start.timestamp()), "until": iso(end.timestamp())}
    fallback = fallback_price or settings_price(None)
    tables = _tables(conn)

    states = (
        {t: (s, a) for t, s, a in conn.execute("SELECT task, state, adapter FROM task_states")}
        if "task_states" in tables
        else {}
    )
    pairs = (
        {t: (n, agreed or 0) for t, n, agreed in conn.execute(_PAIRS_SQL, params)}
        if {"task_states", "shadow_pairs"} <= tables
        else {}
    )
    p50 = {(t, r): ms for t, r, ms in conn.execute(_P50_SQL.format(by="task, route", where="1=1"), params)}
    observed = {
        t: Price(input_per_mtok=c / tok * 1e6, output_per_mtok=c / tok * 1e6, source="observed")
        for t, c, tok in conn.execute(_OBSERVED_PRICE_SQL)
        if tok
    }

    grain = granularity(start, end)
    starts = bucket_starts(start, end, grain)
    calls, per_bucket = _traffic(conn, {**params, "first": int(starts[0]), "width": BUCKET_S[grain]}, starts)
    total = sum(c[0] for c in calls.values())
    rows: list[TaskConversion] = []
    for task in sorted(set(calls) | set(states), key=lambda t: (t is None, -calls.get(t, [0])[0], t or "")):
        n, local, ptok, ctok = calls.get(task, [0, 0, 0, 0])
        state, adapter = states.get(task, ("unmatched" if task is None else "proxied", None))
        n_pairs, agreed = pairs.get(task, (0, 0))
        price = observed.get(task, fallback) if task is not None else fallback
        rows.append(
            TaskConversion(
                task=task,
                state=state,
                adapter=adapter,
                calls=n,
                local=local,
                share=n / total if total else 0.0,
                local_share=local / n if n else None,
                pairs=n_pairs,
                agreed=agreed,
                agreement=agreed / n_pairs if n_pairs else None,
                # The bound promotion decides on (one-sided 95 %), so the report and the state agree.
                agreement_lower=wilson_bounds(agreed, n_pairs, Z_ONE_SIDED_95)[0] if n_pairs else None,
                local_p50_ms=p50.get((task, "local")),
                remote_p50_ms=p50.get((task, "remote")),
                tokens_saved=ptok + ctok,
                cost_saved_usd=price.cost(ptok, ctok),
                price=price,
                buckets=per_bucket[task],
            )
        )

    converted = [r for r in rows if r.task is not None and r.local]
    weighted = [r for r in converted if r.agreement is not None]
    weight = sum(r.local for r in weighted)
    local_p50, remote_p50 = _pooled_p50(conn, params, [r.task for r in converted if r.task])
    return ConversionReport(
        since=params["since"],  # type: ignore[arg-type]  # built as str above
        until=params["until"],  # type: ignore[arg-type]
        granularity=grain,
        calls=total,
        local=sum(r.local for r in rows),
        agreement=sum(r.local * (r.agreement or 0) for r in weighted) / weight if weight else None,
        local_p50_ms=local_p50,
        remote_p50_ms=remote_p50,
        tokens_saved=sum(r.tokens_saved for r in rows),
        cost_saved_usd=sum(r.cost_saved_usd for r in rows),
        tasks=rows,
        buckets=[
            Bucket(
                start=iso(s),
                calls=sum(per_bucket[t][i].calls for t in calls),
                local=sum(per_bucket[t][i].local for t in calls),
            )
            for i, s in enumerate(starts)
        ],
    )


def _traffic(
    conn: sqlite3.Connection, params: dict[str, str | int], starts: list[float]
) -> tuple[dict[str | None, list[int]], dict[str | None, list[Bucket]]]:
    """Per task: [calls, local, local prompt tokens, local completion tokens], and its buckets."""
    totals: dict[str | None, list[int]] = {}
    per_bucket: dict[str | None, list[Bucket]] = defaultdict(lambda: [Bucket(start=iso(s)) for s in starts])
    for task, b, n, local, ptok, ctok in conn.execute(_TRAFFIC_SQL, params):
        sums = totals.setdefault(task, [0, 0, 0, 0])
        for i, value in enumerate((n, local or 0, ptok, ctok)):
            sums[i] += value
        if 0 <= b < len(starts):
            per_bucket[task][b] = Bucket(start=iso(starts[b]), calls=n, local=local or 0)
    return totals, per_bucket


def _pooled_p50(
    conn: sqlite3.Connection, params: dict[str, str | int], tasks: list[str]
) -> tuple[float | None, float | None]:
    """Local vs remote p50 over the tasks answered locally: the same work, compared like for like."""
    if not tasks:
        return None, None
    names = {f"t{i}": t for i, t in enumerate(tasks)}
    where = f"task IN ({', '.join(':' + k for k in names)})"
    found = dict(conn.execute(_P50_SQL.format(by="route", where=where), {**params, **names}).fetchall())
    return found.get("local"), found.get("remote")


def _first_trace(conn: sqlite3.Connection) -> datetime | None:
    first = conn.execute("SELECT min(created_at) FROM traces").fetchone()[0]
    return datetime.fromtimestamp(epoch(first), UTC) if first else None


def _tables(conn: sqlite3.Connection) -> set[str]:
    """A database not yet migrated to m003 (an old file opened read-only) has no state tables."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
