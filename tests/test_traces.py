"""The trace store: migrations, writes, paging, export."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sqlite_utils
from click.testing import CliRunner

from slm_agent.cli import main as cli
from slm_agent.contracts.records import Feedback, TraceRecord
from slm_agent.errors import NotFoundError
from slm_agent.runtime.store.migrations import MIGRATIONS, migrate, pending
from slm_agent.runtime.store.traces import TraceStore


def test_migrations_on_a_blank_database(tmp_path: Path) -> None:
    db = sqlite_utils.Database(tmp_path / "t.db")
    assert pending(db) == [m.__name__ for m in MIGRATIONS]
    assert migrate(db) == [m.__name__ for m in MIGRATIONS]
    assert migrate(db) == []
    columns = {c.name for c in db["traces"].columns}
    assert {"id", "seq", "created_at", "task", "adapter", "route", "route_reason", "request", "tools", "response",
            "tool_calls", "finish_reason", "prompt_tokens", "completion_tokens", "ttft_ms", "latency_ms",
            "tokens_per_s", "status", "error", "attempts", "redactions", "cost_usd"} <= columns  # fmt: skip
    assert {"sessions", "feedback", "spans", "_migrations"} <= set(db.table_names())


def test_a_database_from_the_first_release_is_brought_forward(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    db.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    MIGRATIONS[0](db)
    db.execute("INSERT INTO _migrations VALUES ('m001_initial', '2026-01-01')")
    db.execute(
        "INSERT INTO traces (id, created_at, endpoint, status) VALUES ('tr_old', '2026-01-01T00:00:00Z', 'tasks', 200)"
    )
    db.conn.commit()
    store = TraceStore(path)
    assert store.get("tr_old").endpoint == "tasks"
    assert pending(store.db) == []


def test_insert_get_list_and_feedback(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.db")
    for i in range(25):
        store.insert(
            TraceRecord(
                endpoint="tasks", task="extract" if i % 2 else "classify", request={"input": f"n{i}"},
                status=200 if i % 5 else 500, latency_ms=float(i), session_id="s1",
            )
        )  # fmt: skip
    page = store.list(limit=10)
    assert len(page) == 10 and page[0].seq == 25
    older = store.list(limit=10, before_seq=page[-1].seq)
    assert older[0].seq == page[-1].seq - 1
    assert all(t.task == "extract" for t in store.list(task="extract"))
    assert all(t.status >= 400 for t in store.list(errors_only=True))
    first = store.list(limit=1)[0]
    assert store.get(first.id).request == {"input": "n24"}
    store.add_feedback(first.id, Feedback(rating="good", correction="fixed"))
    assert store.feedback_for(first.id)[0].correction == "fixed"
    with pytest.raises(NotFoundError):
        store.add_feedback("tr_missing", Feedback(rating="bad"))
    stats = store.stats()
    assert stats.total == 25 and stats.errors == 5 and stats.feedback == 1
    assert stats.latency_ms_p50 == 12.0
    assert sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "t.db").stat().st_mode & 0o077 == 0


def test_traces_cli_and_export(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    store = TraceStore(db)
    ids = [store.insert(TraceRecord(endpoint="tasks", task="extract", output={"a": i})).id for i in range(3)]
    runner = CliRunner()
    listed = runner.invoke(cli, ["traces", "list", "--db", str(db)])
    assert listed.exit_code == 0 and ids[-1] in listed.output
    shown = runner.invoke(cli, ["traces", "show", ids[0], "--db", str(db)])
    assert json.loads(shown.output)["output"] == {"a": 0}
    out = tmp_path / "t.jsonl"
    assert runner.invoke(cli, ["traces", "export", "--db", str(db), "-o", str(out)]).exit_code == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ids
    pout = tmp_path / "t.parquet"
    assert (
        runner.invoke(
            cli, ["traces", "export", "--db", str(db), "--format", "parquet", "-o", str(pout)]
        ).exit_code
        == 0
    )
    assert pq.read_table(pout).num_rows == 3
    stats = runner.invoke(cli, ["traces", "stats", "--db", str(db)])
    assert json.loads(stats.output)["total"] == 3
    missing = runner.invoke(cli, ["traces", "list", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no trace database" in missing.output
