"""Agent-run spans in the trace database's ``spans`` table (migration m001): one row per run,
plan, step attempt and final answer, linked by ``run_id`` and ``parent_id``.

Its own connection to the same WAL database: span writes never wait on trace writes' lock.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import new_id, utcnow
from slm_agent.contracts.records import decode_row
from slm_agent.errors import NotFoundError
from slm_agent.runtime.store.connection import LockedConnection

SPAN_JSON_COLUMNS = ("input", "output")


class Span(BaseModel):
    id: str = Field(default_factory=lambda: new_id("sp"))
    seq: int | None = None
    run_id: str
    parent_id: str | None = None
    step: int | None = Field(None, description="1-based plan step; None for run, plan and final.")
    # Plain strings, not enums: the monitor reads spans other releases and tools wrote, too.
    kind: str = Field(description="What the daemon writes: run, plan, task, remote, tool or final.")
    name: str | None = None
    route: str | None = Field(None, description="local or remote.")
    status: str = Field("running", description="running, ok, error, pending_tool or skipped.")
    trace_id: str | None = Field(None, description="The trace of the model call this span made.")
    input: Any = None
    output: Any = None
    error: str | None = None
    started_at: str = Field(default_factory=utcnow)
    ended_at: str | None = None
    duration_ms: float | None = None


_COLUMNS = [n for n in Span.model_fields if n != "seq"]


class SpanStore(LockedConnection):
    def save(self, span: Span) -> Span:
        """Insert the span, or update it when its id is already stored."""
        row = {n: getattr(span, n) for n in _COLUMNS}
        row |= self.at_rest({"input": span.input, "output": span.output, "error": span.error})
        values = [
            json.dumps(row[n], ensure_ascii=False) if n in SPAN_JSON_COLUMNS else row[n] for n in _COLUMNS
        ]
        updates = ", ".join(
            f"{n} = excluded.{n}" for n in _COLUMNS if n not in ("id", "run_id", "started_at")
        )
        sql = (
            f"INSERT INTO spans ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
            f"ON CONFLICT(id) DO UPDATE SET {updates}"
        )
        with self._lock:
            self._conn.execute(sql, values)
            row = self._conn.execute("SELECT seq FROM spans WHERE id = ?", [span.id]).fetchone()
        span.seq = row[0]
        return span

    def run(self, run_id: str) -> list[Span]:
        with self._lock:
            return read_run(self._conn, run_id)


def read_run(conn: sqlite3.Connection, run_id: str) -> list[Span]:
    """A run's spans in the order they started; NotFoundError for an unknown run.

    Input and output that are not JSON (a span written by hand or by another tool) stay text.
    """
    rows = conn.execute("SELECT * FROM spans WHERE run_id = ? ORDER BY seq", [run_id]).fetchall()
    if not rows:
        raise NotFoundError(f"no agent run with id {run_id!r}")
    return [Span.model_validate(decode_row(dict(r), SPAN_JSON_COLUMNS, lenient=True)) for r in rows]
