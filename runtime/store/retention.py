"""Trace retention: the one place that deletes rows from the trace database.

Traces older than ``retention_days`` go, then the oldest while the database is over ``max_db_mb``.
A trace the sync target has not acknowledged yet (or whose feedback it has not) is never deleted:
the collector would lose it for good. Freed pages go back to the disk with an incremental vacuum.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field

from slm_agent.contracts.clock import iso
from slm_agent.contracts.wire import SyncSettings
from slm_agent.errors import SlmAgentError
from slm_agent.progress import ProgressFn
from slm_agent.runtime.store.settings import TraceSettings
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.state import read_state

log = logging.getLogger(__name__)

_BATCH = 500
_MiB = 2**20
# Whatever else a trace owns is found by its id; agent-run spans and shadow pairs age out alike.
_AGED_TABLES = (("spans", "started_at"), ("shadow_pairs", "created_at"), ("sessions", "last_seen"))


class SyncedUpTo(BaseModel):
    """The sync target's acknowledged cursors: rows at or below them are safe at the collector."""

    trace_seq: int = 0
    feedback_seq: int = 0


class PruneResult(BaseModel):
    dry_run: bool
    cutoff: str | None = Field(None, description="Traces created before this time were due.")
    by_age: int = Field(0, description="Traces deleted (or due, in a dry run) for their age.")
    by_size: int = Field(
        0, description="Oldest traces deleted (or due) to bring the database under its limit."
    )
    feedback: int = 0
    other_rows: int = Field(0, description="Spans, shadow pairs and sessions past the retention period.")
    kept_unsynced: int = Field(0, description="Traces due for deletion but kept: not yet synced.")
    used_mb_before: float
    used_mb_after: float

    @property
    def traces(self) -> int:
        return self.by_age + self.by_size


def synced_up_to(store: TraceStore, sync: SyncSettings) -> SyncedUpTo | None:
    """What prune may delete under sync: None when sync is not configured (anything may go)."""
    if not (sync.enabled or sync.target):
        return None
    if not sync.target:  # enabled without a target: nothing was ever sent, so nothing may go
        return SyncedUpTo()
    state = read_state(store, sync.target)
    return SyncedUpTo(trace_seq=state.trace_seq, feedback_seq=state.feedback_seq)


def used_bytes(store: TraceStore) -> int:
    """Bytes in live pages: what the database holds, whether or not freed pages went back yet."""
    conn = store.db.conn
    pages = (
        conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
    )
    return int(pages * conn.execute("PRAGMA page_size").fetchone()[0])


def prune(
    store: TraceStore,
    settings: TraceSettings,
    synced: SyncedUpTo | None,
    *,
    dry_run: bool = False,
    on_progress: ProgressFn | None = None,
    now: datetime | None = None,
) -> PruneResult:
    """Delete (or, with ``dry_run``, count) the traces ``settings`` no longer keeps."""
    now = now or datetime.now(UTC)
    cutoff = (
        iso((now - timedelta(days=settings.retention_days)).timestamp()) if settings.retention_days else None
    )
    result = PruneResult(
        dry_run=dry_run, cutoff=cutoff, used_mb_before=used_bytes(store) / _MiB, used_mb_after=0
    )
    safe, safe_params = _safe_clause(synced)
    if cutoff:
        due = _count(store, "created_at < ?", [cutoff])
        deletable = _count(store, f"created_at < ? AND {safe}", [cutoff, *safe_params])
        result.kept_unsynced = due - deletable
        if dry_run:
            result.by_age = deletable
        else:
            result.by_age, result.feedback = _delete(
                store, f"created_at < ? AND {safe}", [cutoff, *safe_params], deletable, on_progress
            )
            result.other_rows = _delete_aged(store, cutoff)
    if settings.max_db_mb:
        limit = int(settings.max_db_mb * _MiB)
        if dry_run:
            result.by_size = _estimate_over(store, limit, safe, safe_params, skip=result.by_age)
        else:
            # A batch sized by the traces' average size, so the loop stops near the limit, not past it.
            while (over := _estimate_over(store, limit, safe, safe_params, skip=0)) > 0:
                deleted, feedback = _delete(
                    store, safe, safe_params, over, on_progress, batch=over, once=True
                )
                if not deleted:
                    break
                result.by_size += deleted
                result.feedback += feedback
        if used_bytes(store) > limit:  # still over: what is left is not synced yet
            unsynced = _count(store, "1=1", []) - _count(store, safe, safe_params)
            result.kept_unsynced = max(result.kept_unsynced, unsynced)
    result.used_mb_after = used_bytes(store) / _MiB
    if result.traces and not dry_run:
        log.info("pruned %d traces (%d for age, %d for size)", result.traces, result.by_age, result.by_size)
    return result


def vacuum(store: TraceStore, max_pages: int = 4096) -> None:
    """Give freed pages back to the disk: a few at a time, or once in full for a database created
    before incremental vacuum (that VACUUM switches it over for good)."""
    conn = store.db.conn
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:  # incremental
        conn.execute(f"PRAGMA incremental_vacuum({int(max_pages)})").fetchall()
    else:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")


def _safe_clause(synced: SyncedUpTo | None) -> tuple[str, list[object]]:
    if synced is None:
        return "1=1", []
    return (
        "seq <= ? AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.trace_id = traces.id AND f.seq > ?)",
        [synced.trace_seq, synced.feedback_seq],
    )


def _count(store: TraceStore, where: str, params: list[object]) -> int:
    return int(store.db.conn.execute(f"SELECT count(*) FROM traces WHERE {where}", params).fetchone()[0])


def _delete(
    store: TraceStore,
    where: str,
    params: list[object],
    total: int,
    on_progress: ProgressFn | None,
    *,
    batch: int = _BATCH,
    once: bool = False,
) -> tuple[int, int]:
    """Oldest first, one short transaction per batch so requests are never held up long."""
    traces = feedback = 0
    while True:
        with store.transaction() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM traces WHERE {where} ORDER BY seq LIMIT ?", [*params, min(batch, _BATCH)]
                ).fetchall()
            ]
            if not ids:
                break
            marks = ",".join("?" * len(ids))
            feedback += conn.execute(f"DELETE FROM feedback WHERE trace_id IN ({marks})", ids).rowcount
            traces += conn.execute(f"DELETE FROM traces WHERE id IN ({marks})", ids).rowcount
        if on_progress:
            on_progress(traces, max(total, traces))
        if once:
            break
    return traces, feedback


def _delete_aged(store: TraceStore, cutoff: str) -> int:
    with store.transaction() as conn:
        return sum(
            conn.execute(f"DELETE FROM {table} WHERE {column} < ?", [cutoff]).rowcount
            for table, column in _AGED_TABLES
        )


def _estimate_over(store: TraceStore, limit: int, safe: str, params: list[object], skip: int) -> int:
    """How many of the oldest traces a real run would delete for size: by their average size."""
    used, total = used_bytes(store), _count(store, "1=1", [])
    if used <= limit or not total:
        return 0
    needed = -(-(used - limit) * total // used)
    return max(0, min(needed - skip, _count(store, safe, params) - skip))


class RetentionWorker:
    """Prunes every ``prune_interval_s`` while the daemon is idle (``busy()`` false), then vacuums.

    It runs on its own connection in a daemon thread; a failed prune is logged and tried again
    at the next interval, and the daemon never waits on it.
    """

    def __init__(
        self,
        settings: TraceSettings,
        sync: SyncSettings,
        db_path: Path,
        *,
        busy: Callable[[], bool] = lambda: False,
        idle_poll_s: float = 5.0,
    ) -> None:
        self.settings = settings
        self.sync = sync
        self.db_path = Path(db_path)
        self._busy = busy
        self._idle_poll_s = idle_poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_result: PruneResult | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="slm-agent-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        # Opened at the first prune, once the daemon has created and migrated the database.
        store: TraceStore | None = None
        try:
            while not self._stop.wait(self.settings.prune_interval_s):
                while self._busy() and not self._stop.wait(self._idle_poll_s):
                    pass
                if self._stop.is_set():
                    break
                store = store or TraceStore(self.db_path)
                self.run_once(store)
        finally:
            if store is not None:
                store.close()

    def run_once(self, store: TraceStore) -> None:
        started = time.monotonic()
        try:
            self.last_result = prune(store, self.settings, synced_up_to(store, self.sync))
            if self.last_result.traces and not self._busy():
                vacuum(store)
        except SlmAgentError as exc:
            log.warning(
                "trace prune failed (%s); next try in %.0fs", exc.message, self.settings.prune_interval_s
            )
        except Exception:  # the worker must outlive any bug in one prune
            log.exception("trace prune crashed; next try in %.0fs", self.settings.prune_interval_s)
        else:
            log.debug("trace prune took %.2fs", time.monotonic() - started)
