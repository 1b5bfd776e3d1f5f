"""The trace store: every request, response, tool call and metric, in SQLite (WAL).

The database is meant to be read by other tools too (sqlite-utils, Datasette, the TUI): plain
column names, JSON in JSON columns, times in UTC ISO-8601.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils
from pydantic import BaseModel

from slm_agent.contracts.records import Feedback, FeedbackRecord, TraceRecord, decode_row, encode_column
from slm_agent.errors import NotFoundError, StorageFullError
from slm_agent.permissions import private_sqlite
from slm_agent.privacy.scrub import Sanitizer
from slm_agent.runtime.store.migrations import migrate
from slm_agent.runtime.store.queries import ReadOnlyDb

# ENOSPC surfaces as SQLITE_FULL, a file size limit (EFBIG) as a failed write.
_NO_ROOM = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC}


class TraceStats(BaseModel):
    total: int
    errors: int
    by_route: dict[str, int]
    by_task: dict[str, int]
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    completion_tokens: int
    feedback: int


_TRACE_COLUMNS = [name for name in TraceRecord.model_fields if name != "seq"]
_INSERT_SQL = (
    f"INSERT INTO traces ({', '.join(_TRACE_COLUMNS)}) VALUES ({', '.join('?' * len(_TRACE_COLUMNS))})"
)
# What a caller wrote or a model answered: the columns `store_redacted` keeps only redacted.
_CONTENT_COLUMNS = ("request", "tools", "params", "response", "output", "tool_calls", "error", "attempts")


class TraceStore:
    """One connection guarded by a lock: writes are tiny, and WAL lets other processes read.

    With ``store_redacted`` the secrets and personal data of a trace's content (and of feedback
    text) are replaced before the row is written, so the raw text never reaches the disk.
    """

    def __init__(self, path: Path, *, store_redacted: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_sqlite(self.path)  # traces hold prompts: readable by their owner only
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        # Takes effect on a new database (before its first table): retention can then give freed
        # pages back a few at a time instead of rewriting the whole file.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a crash of this process; only an OS crash could drop the tail.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.Lock()
        self._listeners: list[Callable[[TraceRecord], None]] = []
        self._sanitizer = Sanitizer() if store_redacted else None
        with self._lock:
            migrate(self.db)
        # The monitor's and the event replay's queries: they never wait on this store's lock.
        self.reader = ReadOnlyDb(self.path)

    def close(self) -> None:
        self.reader.close()
        with self._lock:
            self.db.conn.close()

    def add_listener(self, listener: Callable[[TraceRecord], None]) -> None:
        """Call ``listener`` with every trace after it is committed (the live event feed uses it)."""
        self._listeners.append(listener)

    # -- writes ----------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a full disk becomes a StorageFullError and leaves earlier rows intact."""
        with self._lock:
            conn = self.db.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode in _NO_ROOM:
                    raise StorageFullError(
                        f"cannot write to the trace database {self.path} ({exc}): the disk is full or a "
                        "file size limit was hit; free space. Traces already written are kept; this "
                        "request's was not recorded"
                    ) from exc
                raise

    def insert(self, trace: TraceRecord) -> TraceRecord:
        """Commit one trace; returns it (redacted, with ``store_redacted``) with its sequence number."""
        trace = self._at_rest(trace)
        values = [encode_column(name, getattr(trace, name)) for name in _TRACE_COLUMNS]
        with self.transaction() as conn:
            cur = conn.execute(_INSERT_SQL, values)
            if trace.session_id:
                conn.execute(
                    """INSERT INTO sessions (id, agent, first_seen, last_seen, request_count)
                       VALUES (?, ?, ?, ?, 1)
                       ON CONFLICT(id) DO UPDATE SET last_seen = excluded.last_seen,
                         request_count = request_count + 1, agent = COALESCE(excluded.agent, agent)""",
                    [trace.session_id, trace.agent, trace.created_at, trace.created_at],
                )
        stored = trace.model_copy(update={"seq": cur.lastrowid})
        for listener in self._listeners:
            listener(stored)
        return stored

    def add_feedback(self, trace_id: str, feedback: Feedback) -> FeedbackRecord:
        self.get(trace_id)
        if self._sanitizer is not None:
            feedback = Feedback.model_validate(self._sanitizer.clean(feedback.model_dump()))
        record = FeedbackRecord(trace_id=trace_id, **feedback.model_dump())
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO feedback (trace_id, created_at, rating, correction, comment, source) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    trace_id,
                    record.created_at,
                    record.rating,
                    record.correction,
                    record.comment,
                    record.source,
                ],
            )
        return record.model_copy(update={"seq": cur.lastrowid})

    def _at_rest(self, trace: TraceRecord) -> TraceRecord:
        if self._sanitizer is None:
            return trace
        content = {name: getattr(trace, name) for name in _CONTENT_COLUMNS}
        return trace.model_copy(update=self._sanitizer.clean(content))

    def tag_signature(self, signature: str, task: str) -> int:
        """Give a newly accepted task the traces recorded before it existed; returns how many.

        Only traces no task claimed yet: an explicit or earlier match is the better witness.
        """
        with self.transaction() as conn:
            cur = conn.execute(
                "UPDATE traces SET task = ?, match_method = 'signature', match_score = 1.0 "
                "WHERE signature = ? AND task IS NULL",
                [task, signature],
            )
        return cur.rowcount

    # -- reads -----------------------------------------------------------------------------------
    def _read(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.conn.execute(sql, params).fetchall()

    def get(self, trace_id: str) -> TraceRecord:
        rows = self._read("SELECT * FROM traces WHERE id = ?", [trace_id])
        if not rows:
            raise NotFoundError(f"no trace with id {trace_id!r}")
        return TraceRecord.model_validate(decode_row(dict(rows[0])))

    def feedback_for(self, trace_id: str) -> list[FeedbackRecord]:
        rows = self._read("SELECT * FROM feedback WHERE trace_id = ? ORDER BY seq", [trace_id])
        return [FeedbackRecord.model_validate(dict(r)) for r in rows]

    def list(
        self,
        *,
        limit: int = 50,
        before_seq: int | None = None,
        after_seq: int | None = None,
        task: str | None = None,
        route: str | None = None,
        errors_only: bool = False,
    ) -> list[TraceRecord]:
        """Newest first, paged by sequence number (never loads the whole table)."""
        where, params = ["1=1"], []
        for clause, value in (
            ("seq < ?", before_seq),
            ("seq > ?", after_seq),
            ("task = ?", task),
            ("route = ?", route),
        ):
            if value is not None:
                where.append(clause)
                params.append(value)
        if errors_only:
            where.append("status >= 400")
        rows = self._read(
            f"SELECT * FROM traces WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", [*params, limit]
        )
        return [TraceRecord.model_validate(decode_row(dict(r))) for r in rows]

    def iter_all(self, batch: int = 1000) -> Iterator[TraceRecord]:
        last = 0
        while True:
            rows = self._read("SELECT * FROM traces WHERE seq > ? ORDER BY seq LIMIT ?", [last, batch])
            if not rows:
                return
            for row in rows:
                yield TraceRecord.model_validate(decode_row(dict(row)))
            last = rows[-1]["seq"]

    def count(self) -> int:
        return int(self._read("SELECT count(*) FROM traces")[0][0])

    def stats(self) -> TraceStats:
        total, errors, tokens = self._read(
            "SELECT count(*), sum(status >= 400), coalesce(sum(completion_tokens), 0) FROM traces"
        )[0]
        by_route = {k: v for k, v in self._read("SELECT route, count(*) FROM traces GROUP BY route")}
        by_task = {
            (k or "(none)"): v for k, v in self._read("SELECT task, count(*) FROM traces GROUP BY task")
        }
        timed = int(self._read("SELECT count(*) FROM traces WHERE latency_ms IS NOT NULL")[0][0])
        p50, p95 = self._percentile(0.5, timed), self._percentile(0.95, timed)
        feedback = int(self._read("SELECT count(*) FROM feedback")[0][0])
        return TraceStats(
            total=total,
            errors=errors or 0,
            by_route=by_route,
            by_task=by_task,
            latency_ms_p50=p50,
            latency_ms_p95=p95,
            completion_tokens=tokens,
            feedback=feedback,
        )

    def _percentile(self, q: float, n: int) -> float | None:
        """The q-quantile of latency over the ``n`` traces that have one."""
        if not n:
            return None
        offset = min(n - 1, int(q * n))
        row = self._read(
            "SELECT latency_ms FROM traces WHERE latency_ms IS NOT NULL ORDER BY latency_ms LIMIT 1 OFFSET ?",
            [offset],
        )
        return float(row[0][0])
