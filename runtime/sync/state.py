"""Sync's state in the device's trace DB (migration m002): store ids, per-target cursors, backlog.

Every read and write of ``sync_state`` and ``sync_meta`` is here. Each statement runs on the store's
autocommit connection, so each is its own durable transaction (WAL).
"""

from __future__ import annotations

import sqlite3

from pydantic import BaseModel

from slm_agent.contracts.clock import utcnow
from slm_agent.contracts.wire import SyncBatch, SyncSettings
from slm_agent.runtime.store.traces import TraceStore
from slm_agent.runtime.sync.targets import normalize_target


class SyncState(BaseModel):
    target: str
    trace_seq: int = 0
    feedback_seq: int = 0
    pending_trace_seq: int | None = None
    pending_feedback_seq: int | None = None
    pushed_traces: int = 0
    pushed_feedback: int = 0
    last_attempt_at: str | None = None
    last_success_at: str | None = None
    last_error: str | None = None


def connection(store: TraceStore) -> sqlite3.Connection:
    """The store's autocommit connection, on which sync reads rows and moves its cursors."""
    return store.db.conn


def store_ids(store: TraceStore, settings: SyncSettings) -> tuple[str, str]:
    """(device_id, store_id): the configured device id or the one generated in the trace DB."""
    meta = dict(connection(store).execute("SELECT key, value FROM sync_meta").fetchall())
    return settings.device_id or meta["device_id"], meta["store_id"]


def read_state(store: TraceStore, target: str) -> SyncState:
    target = normalize_target(target)
    conn = connection(store)
    conn.execute("INSERT OR IGNORE INTO sync_state (target) VALUES (?)", [target])
    row = conn.execute("SELECT * FROM sync_state WHERE target = ?", [target]).fetchone()
    return SyncState.model_validate(dict(row))


def all_states(store: TraceStore) -> list[SyncState]:
    rows = connection(store).execute("SELECT * FROM sync_state ORDER BY target").fetchall()
    return [SyncState.model_validate(dict(r)) for r in rows]


def backlog(store: TraceStore, state: SyncState) -> int:
    return int(
        connection(store)
        .execute("SELECT count(*) FROM traces WHERE seq > ?", [state.trace_seq])
        .fetchone()[0]
    )


def record_pending(store: TraceStore, target: str, trace_to: int, feedback_to: int) -> None:
    """Keep a batch's bounds before sending it, so a crash resends the very same batch."""
    connection(store).execute(
        "UPDATE sync_state SET pending_trace_seq = ?, pending_feedback_seq = ? WHERE target = ?",
        [trace_to, feedback_to, target],
    )


def record_acknowledged(store: TraceStore, target: str, batch: SyncBatch) -> None:
    """Move the cursor past an acknowledged batch and clear its pending bounds."""
    connection(store).execute(
        "UPDATE sync_state SET trace_seq = max(trace_seq, ?), feedback_seq = max(feedback_seq, ?), "
        "pending_trace_seq = NULL, "
        "pending_feedback_seq = NULL, pushed_traces = pushed_traces + ?, "
        "pushed_feedback = pushed_feedback + ?, last_success_at = ?, last_error = NULL "
        "WHERE target = ?",
        [batch.trace_to, batch.feedback_to, len(batch.traces), len(batch.feedback), utcnow(), target],
    )


def record_attempt(store: TraceStore, target: str) -> None:
    connection(store).execute(
        "UPDATE sync_state SET last_attempt_at = ? WHERE target = ?", [utcnow(), target]
    )


def record_error(store: TraceStore, target: str, message: str) -> None:
    connection(store).execute("UPDATE sync_state SET last_error = ? WHERE target = ?", [message, target])
