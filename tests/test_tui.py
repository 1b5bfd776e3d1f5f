"""The monitor: SQL aggregates and paging, sources, screens driven by Pilot, and SVG snapshots."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from lora import make_lora
from textual.widgets import DataTable, Input, Static, Tree

from slm_agent.contracts.clock import iso
from slm_agent.contracts.records import Feedback, TraceRecord
from slm_agent.models import BUNDLED_NAME, ModelStore
from slm_agent.runtime.config import Settings
from slm_agent.runtime.http.app import create_app as create_daemon_app
from slm_agent.runtime.store import queries as mon
from slm_agent.runtime.store.traces import TraceStore
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


# -- the daemon's own app in this process: every route real, over the seeded database --------------------
ADAPTERS = ("extract-fields-v3", "pick-tool-v2")
# The demo traffic's tasks as task files; extract_fields pins its adapter, so it loads at start.
DEMO_TASKS = {
    "extract_fields": {"routing": "auto", "adapter": "extract-fields-v3"},
    "pick_tool": {"routing": "local"},
    "classify_intent": {"routing": "remote"},
}


@pytest.fixture(scope="module")
def model_store(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> ModelStore:
    """The bundled base model and two small real LoRA adapters built for it."""
    root = tmp_path_factory.mktemp("tui-models")
    models = ModelStore(root / "store")
    models.add(model_path, name=BUNDLED_NAME)
    for i, name in enumerate(ADAPTERS):
        models.add(make_lora(root / f"{name}.gguf", model_path, seed=i), name=name)
    return models


@pytest.fixture
def daemon_app(store: TraceStore, model_store: ModelStore, tmp_path: Path) -> Iterator[FastAPI]:
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for name, fields in DEMO_TASKS.items():
        lines = [f"name = {json.dumps(name)}", f'description = "{name} task"']
        lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
        (tasks_dir / f"{name}.toml").write_text("\n".join(lines) + "\n")
    settings = Settings(
        store_dir=model_store.root, db_path=store.path, tasks_dir=tasks_dir, n_threads=2, n_ctx=2048
    )
    app = create_daemon_app(settings)
    with TestClient(
        app, base_url="http://localhost"
    ) as client:  # runs the lifespan: services built, weights loading meanwhile
        deadline = time.monotonic() + 60
        while client.get("/healthz").json().get("adapters") != ["extract-fields-v3"]:
            assert time.monotonic() < deadline, client.get("/healthz").text
            time.sleep(0.05)
        yield app


@pytest.fixture
def daemon_source(daemon_app: FastAPI) -> DaemonSource:
    return DaemonSource("http://localhost", transport=httpx.ASGITransport(app=daemon_app), end=END)


# -- SQL, no UI ------------------------------------------------------------------------------------------
def test_stats_buckets_and_percentiles(tmp_path: Path) -> None:
    s = TraceStore(tmp_path / "t.db")
    for i, latency in enumerate([10, 20, 30, 40, 1000]):
        s.insert(TraceRecord(endpoint="/x", created_at=iso((END - timedelta(seconds=7 - i * 0.1)).timestamp()),
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
    health = await daemon_source.health()
    assert health is not None and (health.status, health.queue_depth) == ("ok", 0)


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
        tasks = app.screen.query_one("#task-table", DataTable)
        tasks.move_cursor(row=tasks.get_row_index("classify_intent"))
        await pilot.press("p")  # classify_intent: remote -> auto
        await pilot.pause()
        await pilot.press("down", "enter")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert daemon_app.state.services.tasks.get("classify_intent").routing == "auto"
        models = app.screen.query_one("#model-table", DataTable)
        models.focus()
        await pilot.press("down", "down", "l")  # pick-tool-v2
        await app.workers.wait_for_complete()
        assert "pick-tool-v2" in daemon_app.state.services.engine.adapters


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
