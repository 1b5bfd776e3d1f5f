"""The conversion report: exact figures from a seeded trace database, the CLI, `GET /v1/report` on a
real daemon, and the TUI screen.

The database is real SQLite written through TraceStore; task_states and shadow_pairs rows are
inserted directly, as the shadow worker's store would write them (migration m003's schema).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from textual.widgets import DataTable, Static

from slm_agent.cli import main as cli
from slm_agent.contracts.clock import iso
from slm_agent.contracts.records import TraceRecord
from slm_agent.errors import BadRequestError
from slm_agent.locations import default_db_path
from slm_agent.runtime.remote.settings import RemoteProvider, RemoteSettings
from slm_agent.runtime.report import (
    ConversionReport,
    build_report,
    parse_since,
    render_markdown,
    settings_price,
    sparkline,
)
from slm_agent.runtime.store.queries import ReadOnlyDb
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.tui.app import create_app
from slm_agent.tui.sources import DaemonSource, DbSource

END = datetime(2025, 6, 8, 12, 0, 0, tzinfo=UTC)
SINCE_7D = END - timedelta(days=7)
SIZE = (140, 42)
# The provider's configured price: 2 and 8 USD per million prompt / completion tokens.
SETTINGS = RemoteSettings(
    providers=[RemoteProvider(name="openai", base_url="http://remote", price_per_1k_input=0.002,
                              price_per_1k_output=0.008)]
)  # fmt: skip
HEADLINE_7D = (
    "38 % of calls answered locally at 95 % agreement with the remote, 15.0× faster, "
    "$0.0076 saved since 2025-06-01"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def at(hours_before_end: float) -> str:
    return iso((END - timedelta(hours=hours_before_end)).timestamp())


def seed(path: Path) -> Path:
    """Three tasks in three states, unmatched planning calls, and one call 10 days old.

    - pick_tool, live on pick-tool-v1: 4 remote (800-1200 ms, $10/Mtok observed), 6 local promoted
      (50-100 ms, 120 tokens each), 1 failed local; 19/20 pairs agree (+5 of an old adapter, 1 error).
    - extract, shadow: 5 remote at 2 s with no cost recorded; 8/10 pairs agree.
    - classify, no state (proxied): 2 local (40, 60 ms; 50 + 10 tokens), priced by the settings.
    - 3 unmatched remote calls at 3 s; 1 pick_tool remote call 10 days back.
    """
    store = TraceStore(path)
    chat = "/v1/chat/completions"

    def trace(hours: float, **fields: Any) -> None:
        store.insert(TraceRecord(endpoint=chat, created_at=at(hours), **fields))

    for i, ms in enumerate([800, 900, 1000, 1200]):
        trace(70 - i, task="pick_tool", route="remote", latency_ms=ms, prompt_tokens=100,
              completion_tokens=20, cost_usd=0.0012, match_method="signature")  # fmt: skip
    for i, ms in enumerate([50, 60, 70, 80, 90, 100]):
        trace(20 - i, task="pick_tool", route="local", route_reason="promoted", latency_ms=ms,
              prompt_tokens=100, completion_tokens=20, adapter="pick-tool-v1")  # fmt: skip
    trace(
        10, task="pick_tool", route="local", route_reason="promoted", latency_ms=5, status=500, error="boom"
    )
    for i in range(5):
        trace(
            30 + i, task="extract", route="remote", latency_ms=2000, prompt_tokens=300, completion_tokens=40
        )
    for hours, ms in ((5, 40), (4, 60)):
        trace(hours, task="classify", route="local", route_reason="policy", latency_ms=ms, prompt_tokens=50,
              completion_tokens=10)  # fmt: skip
    for i in range(3):
        trace(1 + i, route="remote", latency_ms=3000, prompt_tokens=500, completion_tokens=200, cost_usd=0.01)
    trace(240, task="pick_tool", route="remote", latency_ms=5000, prompt_tokens=100, completion_tokens=20,
          cost_usd=0.0012)  # fmt: skip
    store.close()

    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO task_states (task, adapter, state, reason, changed_at) VALUES (?, ?, ?, ?, ?)",
            [("pick_tool", "pick-tool-v1", "live", "promoted", at(24)),
             ("extract", "extract-v1", "shadow", "published", at(48))],
        )  # fmt: skip
        pairs: list[tuple[str, str, int | None]] = [
            ("pick_tool", "pick-tool-v1", int(i < 19)) for i in range(20)
        ]
        pairs += [("pick_tool", "pick-tool-v0", 0)] * 5 + [("pick_tool", "pick-tool-v1", None)]
        pairs += [("extract", "extract-v1", int(i < 8)) for i in range(10)]
        conn.executemany(
            "INSERT INTO shadow_pairs (trace_id, task, adapter, created_at, kind, agreed) "
            "VALUES ('tr_x', ?, ?, ?, 'shadow', ?)",
            [(task, adapter, at(30), agreed) for task, adapter, agreed in pairs],
        )
    conn.close()
    return path


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return seed(tmp_path / "traces.db")


def report_of(db: Path, since: datetime | None = SINCE_7D) -> ConversionReport:
    reader = ReadOnlyDb(db)
    try:
        return build_report(reader.conn, since=since, until=END, fallback_price=settings_price(SETTINGS))
    finally:
        reader.close()


# -- figures, no UI ---------------------------------------------------------------------------------------
def test_figures_per_task_are_exact(db: Path) -> None:
    report = report_of(db)
    rows = {r.task: r for r in report.tasks}
    assert [r.task for r in report.tasks] == ["pick_tool", "extract", "classify", None]  # by calls, None last
    pick, extract, classify, unmatched = rows["pick_tool"], rows["extract"], rows["classify"], rows[None]

    assert (pick.state, pick.adapter, pick.calls, pick.local) == ("live", "pick-tool-v1", 11, 6)
    assert pick.share == pytest.approx(11 / 21) and pick.local_share == pytest.approx(6 / 11)
    # The old adapter's pairs and the errored pair do not count.
    assert (pick.pairs, pick.agreed, pick.agreement) == (20, 19, 0.95)
    assert pick.agreement_lower == pytest.approx(0.8040, abs=1e-4)  # Wilson, one-sided 95 %, 19/20
    # Nearest-rank p50; the failed 5 ms local call is no answer.
    assert (pick.local_p50_ms, pick.remote_p50_ms, pick.speedup) == (70, 900, pytest.approx(900 / 70))
    assert pick.tokens_saved == 720 and pick.price.source == "observed"
    assert pick.cost_saved_usd == pytest.approx(720 * 10 / 1e6)  # $0.0012 per 120 remote tokens

    assert (extract.state, extract.calls, extract.local, extract.pairs, extract.agreed) == (
        "shadow",
        5,
        0,
        10,
        8,
    )
    assert (extract.local_p50_ms, extract.remote_p50_ms, extract.cost_saved_usd) == (None, 2000, 0)

    assert (classify.state, classify.adapter, classify.agreement, classify.agreement_lower) == (
        "proxied",
        None,
        None,
        None,
    )
    assert (classify.local_p50_ms, classify.tokens_saved, classify.price.source) == (40, 120, "settings")
    assert classify.cost_saved_usd == pytest.approx((100 * 2 + 20 * 8) / 1e6)

    assert (unmatched.state, unmatched.calls, unmatched.remote_p50_ms) == ("unmatched", 3, 3000)
    assert sum(r.share for r in report.tasks) == pytest.approx(1)


def test_totals_and_headline(db: Path) -> None:
    report = report_of(db)
    assert (report.calls, report.local, report.tokens_saved) == (21, 8, 840)
    # Weighted by local calls among tasks with pairs: only pick_tool.
    assert report.agreement == pytest.approx(0.95)
    # Pooled over the tasks answered locally (pick_tool, classify): local p50 of 8 calls, remote of 4.
    assert (report.local_p50_ms, report.remote_p50_ms) == (60, 900)
    assert report.cost_saved_usd == pytest.approx(0.0072 + 0.00036)
    assert report.headline == HEADLINE_7D


def test_since_filters_traces_and_buckets(db: Path) -> None:
    everything = report_of(db, since=None)
    assert everything.since == at(240) and everything.calls == 22 and everything.granularity == "day"
    assert len(everything.buckets) == 11 and everything.buckets[0].start == "2025-05-29T00:00:00.000Z"

    week = report_of(db)
    assert week.granularity == "day" and [b.start[:10] for b in week.buckets][::7] == [
        "2025-06-01",
        "2025-06-08",
    ]
    assert [(b.calls, b.local) for b in week.buckets] == [(0, 0)] * 4 + [(4, 0), (0, 0), (11, 6), (6, 2)]
    assert sum(b.calls for b in week.buckets) == week.calls

    day = report_of(db, since=parse_since("1d", END))
    assert day.granularity == "hour" and len(day.buckets) == 24
    pick = next(r for r in day.tasks if r.task == "pick_tool")
    assert (pick.calls, pick.local) == (7, 6)
    # The 30 h old shadow pairs are outside the day; the states still show.
    assert (pick.state, pick.pairs, pick.agreement) == ("live", 0, None)
    assert next(r for r in day.tasks if r.task == "extract").calls == 0


def test_parse_since() -> None:
    assert parse_since("7d", END) == SINCE_7D
    assert parse_since("12h", END) == END - timedelta(hours=12)
    assert parse_since("2w", END) == END - timedelta(weeks=2)
    assert parse_since("2025-06-01", END) == datetime(2025, 6, 1, tzinfo=UTC)
    assert parse_since("2025-06-01T09:30:00+02:00", END) == datetime(2025, 6, 1, 7, 30, tzinfo=UTC)
    with pytest.raises(BadRequestError, match="duration"):
        parse_since("last week", END)
    # Found by schemathesis (#16): a huge duration was a 500, a period of millennia took seconds.
    with pytest.raises(BadRequestError, match="before the year 1"):
        parse_since("99999999999w", END)


def test_period_over_a_century_is_refused(db: Path) -> None:
    with pytest.raises(BadRequestError, match="over a century"):
        report_of(db, since=datetime(1, 1, 1, tzinfo=UTC))


def test_an_empty_or_unmigrated_database(tmp_path: Path) -> None:
    TraceStore(tmp_path / "empty.db").close()
    empty = report_of(tmp_path / "empty.db", since=None)
    assert (empty.calls, empty.tasks, empty.agreement, empty.speedup) == (0, [], None, None)
    assert empty.headline.startswith(
        "n/a of calls answered locally at n/a agreement with the remote, n/a faster, $0.00"
    )
    # A file from before m003 (read-only, so never migrated here) still reports its traces.
    old = sqlite3.connect(tmp_path / "old.db")
    old.execute("CREATE TABLE traces (id TEXT, created_at TEXT, task TEXT, route TEXT, status INTEGER, "
                "latency_ms REAL, prompt_tokens INTEGER, completion_tokens INTEGER, cost_usd REAL)")  # fmt: skip
    old.execute("INSERT INTO traces VALUES ('tr_1', ?, 'x', 'local', 200, 10, 5, 5, NULL)", [at(1)])
    old.commit()
    old.close()
    report = report_of(tmp_path / "old.db", since=None)
    assert (report.calls, report.tasks[0].state, report.tasks[0].price.source) == (1, "proxied", "settings")


def test_sparkline() -> None:
    assert sparkline([0, 1, 4, 8]) == "·▁▄█"
    assert len(sparkline(list(range(100)), width=48)) == 34  # summed in groups of 3


def test_json_shape(db: Path) -> None:
    body = json.loads(report_of(db).model_dump_json())
    assert set(body) == {"since", "until", "granularity", "calls", "local", "agreement", "local_p50_ms",
                         "remote_p50_ms", "tokens_saved", "cost_saved_usd", "tasks", "buckets", "headline"}  # fmt: skip
    assert body["headline"] == HEADLINE_7D
    assert set(body["tasks"][0]) >= {"task", "state", "share", "agreement", "agreement_lower", "local_p50_ms",
                                     "remote_p50_ms", "tokens_saved", "cost_saved_usd", "buckets"}  # fmt: skip
    assert ConversionReport.model_validate(body) == report_of(db)  # the TUI reads it back as is


def test_markdown(db: Path) -> None:
    text = render_markdown(report_of(db))
    assert f"**{HEADLINE_7D}**" in text
    assert (
        "| `pick_tool` | live | 52 % | 55 % | 95 % (≥ 80 %, 19/20) | 70 ms | 900 ms | 720 | $0.0072 | `"
        in text
    )
    assert "| (no task) | unmatched | 14 % | 0 % | – | – | 3.00 s | 0 | $0.00 |" in text
    assert "local  ······█▃  (most 6)" in text


# -- CLI ----------------------------------------------------------------------------------------------------
def test_cli_markdown_json_and_file(db: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["report", "--db", str(db), "--since", "2025-06-01T12:00:00Z"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# Conversion report")
    # Until now, not END: the same calls, priced at the default (no provider configured here).
    assert "38 % of calls answered locally at 95 % agreement with the remote, 15.0× faster" in result.output

    out = tmp_path / "report.json"
    result = runner.invoke(cli, ["report", "--db", str(db), "--json", "-o", str(out)])
    assert result.exit_code == 0 and f"wrote the report to {out}" in result.output
    assert ConversionReport.model_validate_json(out.read_text()).calls == 22

    result = runner.invoke(cli, ["report", "--db", str(db), "--since", "yesterday"])
    assert result.exit_code == 1 and "since must be an ISO date" in result.output
    result = runner.invoke(cli, ["report", "--db", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and "no trace database" in result.output


# -- HTTP, on a real daemon ---------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_http_report_matches_the_database(make_daemon: Any) -> None:
    path = seed(default_db_path())  # the isolated home's database, seeded before the daemon opens it
    daemon = make_daemon()
    assert daemon.db_path == path
    source = DaemonSource(daemon.url, end=END)
    try:
        served = await source.report("7d")
    finally:
        await source.close()
    local = DbSource(daemon.db_path, clock=lambda: END)
    try:
        assert served == await local.report("7d")
    finally:
        await local.close()
    assert served.headline.startswith("38 % of calls answered locally at 95 % agreement")
    with daemon.client() as client:
        bad = client.get("/v1/report", params={"since": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"


# -- TUI ----------------------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_screen_shows_the_report(db: Path) -> None:
    app = create_app(DbSource(db, clock=lambda: END, label="db traces.db"), live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        await app.wait_for_loads()
        await pilot.pause()
        headline = str(app.screen.query_one("#report-headline", Static).render())
        assert headline.startswith("36 % of calls answered locally at 95 % agreement")  # all time: 8/22
        table = app.screen.query_one(DataTable)
        assert table.row_count == 5 and table.get_row_at(1)[:2] == ["pick_tool", "live"]
        await pilot.press("2")  # 7 days
        await app.wait_for_loads()
        await pilot.pause()
        assert str(app.screen.query_one("#report-headline", Static).render()) == HEADLINE_7D.replace(
            "$0.0076", "$0.0078"
        )  # classify priced at the default $5/Mtok: no provider in a --db monitor


def test_snapshot_report(snap_compare: Any, db: Path) -> None:
    async def run_before(pilot: Any) -> None:
        await pilot.press("c")
        await pilot.app.wait_for_loads()
        await pilot.pause()

    app = create_app(DbSource(db, clock=lambda: END, label="db traces.db"), live=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
