"""The monitor: SQL aggregates and paging, sources, screens driven by Pilot, and SVG snapshots."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI, HTTPException, Request
from textual.widgets import DataTable, Input, Static, Tree

from slm_agent.runtime import monitor_api as mon
from slm_agent.runtime.events import EventBus
from slm_agent.runtime.traces import Feedback, TraceRecord, TraceStore
from slm_agent.tui import formatting as fmt
from slm_agent.tui.app import create_app
from slm_agent.tui.cli import tui as tui_command
from slm_agent.tui.demo import seed
from slm_agent.tui.screens.trace_detail import TraceDetailScreen
from slm_agent.tui.sources import DaemonSource, DbSource, ReadOnlyError, TaskInfo

END = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
SIZE = (140, 42)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path: Path) -> TraceStore:
    """300 traces over the 10 minutes before END (real rows through TraceStore), feedback, two runs."""
    s = TraceStore(tmp_path / "traces.db")
    seed(s, 300, end=END, span=timedelta(minutes=10))
    yield s
    s.close()


@pytest.fixture
def db_source(store: TraceStore) -> DbSource:
    return DbSource(store.path, clock=lambda: END, label="db traces.db")  # no tmp path: stable snapshots


# -- a stand-in daemon: the real monitor router plus the lead's admin endpoints, minimal -------------------
def standin_app(store: TraceStore) -> FastAPI:
    app = FastAPI()
    app.state.services = SimpleNamespace(traces=store, events=EventBus(store))
    app.state.admin = {"routing": {"extract_fields": "auto", "pick_tool": "local", "classify_intent": "remote"},
                       "loaded": {"extract-fields-v3"}}  # fmt: skip
    app.include_router(mon.router)
    adapters = ["extract-fields-v3", "pick-tool-v2"]

    @app.post("/v1/traces/{trace_id}/feedback")
    def feedback(trace_id: str, body: Feedback) -> dict[str, Any]:
        return store.add_feedback(trace_id, body).model_dump()

    @app.get("/v1/models")
    def models(request: Request) -> dict[str, Any]:
        loaded = request.app.state.admin["loaded"]
        data = [{"id": "gemma-3-270m-q4_k_m", "object": "model", "kind": "base", "loaded": True}]
        data += [{"id": a, "object": "model", "kind": "adapter", "loaded": a in loaded} for a in adapters]
        return {"object": "list", "data": data}

    @app.post("/v1/admin/adapters")
    def load(request: Request, body: dict[str, str]) -> dict[str, Any]:
        request.app.state.admin["loaded"].add(body["name"])
        return {"name": body["name"], "loaded": True}

    @app.delete("/v1/admin/adapters/{name}")
    def unload(request: Request, name: str) -> dict[str, Any]:
        if name not in request.app.state.admin["loaded"]:
            raise HTTPException(404, detail="not loaded")
        request.app.state.admin["loaded"].discard(name)
        return {"name": name, "loaded": False}

    @app.get("/v1/admin/tasks")
    def tasks(request: Request) -> list[dict[str, Any]]:
        adapters_of = {"extract_fields": "extract-fields-v3", "pick_tool": "pick-tool-v2"}
        return [{"name": n, "adapter": adapters_of.get(n), "routing": r, "description": f"{n} task"}
                for n, r in sorted(request.app.state.admin["routing"].items())]  # fmt: skip

    @app.patch("/v1/admin/tasks/{name}")
    def patch_task(request: Request, name: str, body: dict[str, str]) -> dict[str, Any]:
        request.app.state.admin["routing"][name] = body["routing"]
        return {"name": name, "routing": body["routing"]}

    @app.get("/healthz")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": "gemma-3-270m-q4_k_m",
            "adapters": ["extract-fields-v3"],
            "queue_depth": 2,
        }

    return app


@pytest.fixture
def daemon_app(store: TraceStore) -> FastAPI:
    return standin_app(store)


@pytest.fixture
def daemon_source(daemon_app: FastAPI) -> DaemonSource:
    return DaemonSource("http://daemon", transport=httpx.ASGITransport(app=daemon_app), end=END)


# -- SQL, no UI ------------------------------------------------------------------------------------------
def test_stats_buckets_and_percentiles(tmp_path: Path) -> None:
    s = TraceStore(tmp_path / "t.db")
    for i, latency in enumerate([10, 20, 30, 40, 1000]):
        s.insert(TraceRecord(endpoint="/x", created_at=mon.iso(END - timedelta(seconds=7 - i * 0.1)),
                             latency_ms=latency, completion_tokens=10, prompt_tokens=90,
                             route="local" if i < 4 else "remote", route_reason="r", status=200 if i else 500))  # fmt: skip
    stats = mon.query_stats(mon.ReadOnlyDb(s.path).conn, "5m", end=END, price_per_mtok=10.0)
    assert len(stats.buckets) == 60 and stats.bucket_s == 5
    assert stats.requests == 5 and stats.errors == 1 and stats.local == 4
    assert (stats.latency_ms_p50, stats.latency_ms_p95) == (30, 1000)  # nearest rank
    busy = [b for b in stats.buckets if b.requests]
    assert [b.requests for b in busy] == [5] and busy[0].start == "2025-06-01T11:59:50.000Z"
    assert stats.cost_saved_usd == pytest.approx(4 * 100 * 10.0 / 1e6)
    assert {(r.route, r.count) for r in stats.routes} == {("local", 4), ("remote", 1)}
    assert mon.query_stats(mon.ReadOnlyDb(s.path).conn, "5m", end=END + timedelta(hours=1)).requests == 0


def test_traces_keyset_paging_and_filters(store: TraceStore) -> None:
    conn = mon.ReadOnlyDb(store.path).conn
    first = mon.query_traces(conn, mon.TraceFilter(limit=120))
    second = mon.query_traces(conn, mon.TraceFilter(limit=120, before_seq=first.next_before_seq))
    third = mon.query_traces(conn, mon.TraceFilter(limit=120, before_seq=second.next_before_seq))
    seqs = [t.seq for page in (first, second, third) for t in page.items]
    assert seqs == list(range(300, 0, -1)) and third.next_before_seq is None
    errors = mon.query_traces(conn, mon.TraceFilter(errors=True, limit=500)).items
    assert errors and all(t.status >= 400 for t in errors)
    remote = mon.query_traces(conn, mon.TraceFilter(route="remote", task="pick_tool", limit=500)).items
    assert remote and all(t.route == "remote" and t.task == "pick_tool" for t in remote)
    assert [t.id for t in mon.query_traces(conn, mon.TraceFilter(q="invoice #1042")).items] == ["tr_00000042"]
    assert mon.query_traces(conn, mon.TraceFilter(q="100%_")).items == []  # LIKE wildcards are literal


def test_read_only_db_refuses_writes(store: TraceStore) -> None:
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        mon.ReadOnlyDb(store.path).conn.execute("DELETE FROM traces")


def test_formatting_and_task_rows(db_source: DbSource, store: TraceStore) -> None:
    assert (fmt.ms(12.3), fmt.ms(2500), fmt.num(12_345), fmt.pct(0.5), fmt.usd(0)) == (
        "12 ms",
        "2.50 s",
        "12.3k",
        "50%",
        "$0.00",
    )
    stats = mon.query_stats(mon.ReadOnlyDb(store.path).conn, "1h", end=END)
    rows = fmt.task_rows([TaskInfo(name="extract_fields", routing="auto"), TaskInfo(name="idle")], stats)
    by_name = {r.name: r for r in rows}
    assert by_name["idle"].requests == 0 and by_name["extract_fields"].routing == "auto"
    assert by_name["pick_tool"].requests == 100 and 0 < (by_name["pick_tool"].escalation or 0) < 1
    assert len(fmt.series(stats, "requests_per_s")) == 60


@pytest.mark.anyio
async def test_read_only_source_refuses_actions(db_source: DbSource) -> None:
    with pytest.raises(ReadOnlyError, match="--url"):
        await db_source.send_feedback("tr_00000001", Feedback(rating="good"))
    with pytest.raises(ReadOnlyError):
        await db_source.set_routing("pick_tool", "remote")


@pytest.mark.anyio
async def test_daemon_and_db_sources_agree(db_source: DbSource, daemon_source: DaemonSource) -> None:
    f = mon.TraceFilter(limit=20, task="extract_fields")
    assert await db_source.traces(f) == await daemon_source.traces(f)
    assert await db_source.stats("1h") == await daemon_source.stats("1h")
    assert (await db_source.trace("tr_00000299")).feedback == (
        await daemon_source.trace("tr_00000299")
    ).feedback
    assert (await daemon_source.health()).queue_depth == 2  # type: ignore[union-attr]


# -- screens, driven as a person would -----------------------------------------------------------------
@pytest.mark.anyio
async def test_navigate_filter_and_open_trace(db_source: DbSource) -> None:
    app = create_app(db_source, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert "150 requests" in app.screen.sub_title
        await pilot.press("t")
        await app.workers.wait_for_complete()
        table = app.screen.query_one(DataTable)
        assert table.row_count == 100
        await pilot.press("slash")
        app.screen.query_one("#q", Input).value = "invoice #1042"
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert table.row_count == 1
        await pilot.press("enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert isinstance(app.screen, TraceDetailScreen)
        text = " ".join(str(s.render()) for s in app.screen.query(Static))
        assert "request 42 for extract_fields" in text
        await pilot.press("g")  # read-only: a clear message, nothing written
        await pilot.pause()
        assert any("needs a running daemon" in n.message for n in app._notifications)
        await pilot.press("escape", "escape")
        await app.workers.wait_for_complete()
        await pilot.press("e")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert 0 < table.row_count < 100
        await pilot.press("r")
        await app.workers.wait_for_complete()
        await pilot.pause()
        tree = app.screen.query_one(Tree)
        assert "book-travel" in str(tree.root.label) and len(tree.root.children) == 3


@pytest.mark.anyio
async def test_feedback_and_routing_through_daemon(
    daemon_source: DaemonSource, store: TraceStore, daemon_app: FastAPI
) -> None:
    app = create_app(daemon_source, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("enter")  # newest trace
        await app.workers.wait_for_complete()
        await pilot.press("b")
        await app.workers.wait_for_complete()
        await pilot.press("c")
        await pilot.pause()
        area = app.screen.query_one("#correction-text")
        area.text = '{"answer": "fixed"}'  # type: ignore[attr-defined]
        app.screen.query_one("#correction-comment", Input).value = "wrong total"
        await pilot.press("ctrl+s")
        await app.workers.wait_for_complete()
        await pilot.pause()
        got = [(f.rating, f.correction, f.comment) for f in store.feedback_for("tr_00000299")]
        assert got[-2:] == [("bad", None, None), ("bad", '{"answer": "fixed"}', "wrong total")]

        await pilot.press("escape", "m")
        await app.workers.wait_for_complete()
        await pilot.pause()
        await pilot.press("p")  # first task row: classify_intent, remote -> auto
        await pilot.pause()
        await pilot.press("down", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert daemon_app.state.admin["routing"]["classify_intent"] == "auto"
        models = app.screen.query_one("#model-table", DataTable)
        models.focus()
        await pilot.press("down", "down", "l")  # pick-tool-v2
        await app.workers.wait_for_complete()
        assert "pick-tool-v2" in daemon_app.state.admin["loaded"]


def test_cli_help_has_example() -> None:
    result = CliRunner().invoke(tui_command, ["--help"])
    assert result.exit_code == 0 and "Example usage" in result.output and "--db" in result.output


# -- snapshots (regenerate with: pytest tests/test_tui.py --snapshot-update) ---------------------------
def _snap(snap_compare: Any, source: Any, *keys: str) -> bool:
    async def run_before(pilot: Any) -> None:
        for key in keys:
            await pilot.press(key)
            await pilot.app.workers.wait_for_complete()
            await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    return bool(snap_compare(create_app(source, live=False), terminal_size=SIZE, run_before=run_before))


def test_snapshot_dashboard(snap_compare: Any, db_source: DbSource) -> None:
    assert _snap(snap_compare, db_source)


def test_snapshot_traces(snap_compare: Any, db_source: DbSource) -> None:
    assert _snap(snap_compare, db_source, "t")


def test_snapshot_trace_detail(snap_compare: Any, db_source: DbSource) -> None:
    assert _snap(snap_compare, db_source, "t", "down", "enter")


def test_snapshot_tasks(snap_compare: Any, daemon_source: DaemonSource) -> None:
    assert _snap(snap_compare, daemon_source, "m")


def test_snapshot_runs(snap_compare: Any, db_source: DbSource) -> None:
    assert _snap(snap_compare, db_source, "r")
