"""Numbered schema migrations of the trace database.

Append-only: a shipped migration is never edited, so a database written by any release can be
brought forward. Each applied name is recorded in ``_migrations``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append(fn)
    return fn


def applied(db: sqlite_utils.Database) -> list[str]:
    if "_migrations" not in db.table_names():
        return []
    return [row["name"] for row in db["_migrations"].rows]


def pending(db: sqlite_utils.Database) -> list[str]:
    done = set(applied(db))
    return [fn.__name__ for fn in MIGRATIONS if fn.__name__ not in done]


def migrate(db: sqlite_utils.Database) -> list[str]:
    """Apply pending migrations, each in its own transaction; returns the names applied."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    done = set(applied(db))
    ran = []
    for fn in MIGRATIONS:
        if fn.__name__ in done:
            continue
        # Explicit BEGIN: the trace store's connection is in autocommit mode, where `with conn:`
        # would not make the migration atomic.
        db.conn.execute("BEGIN")
        try:
            fn(db)
            db.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                [fn.__name__, datetime.now(UTC).isoformat()],
            )
            db.conn.execute("COMMIT")
        except BaseException:
            if db.conn.in_transaction:
                db.conn.execute("ROLLBACK")
            raise
        ran.append(fn.__name__)
    return ran


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE traces (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            client TEXT,
            session_id TEXT,
            agent TEXT,
            task TEXT,
            model TEXT,
            base_model TEXT,
            adapter TEXT,
            route TEXT NOT NULL DEFAULT 'local',
            route_reason TEXT,
            request TEXT,
            tools TEXT,
            params TEXT,
            response TEXT,
            output TEXT,
            tool_calls TEXT,
            finish_reason TEXT,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            cached_tokens INTEGER,
            queue_ms REAL,
            ttft_ms REAL,
            latency_ms REAL,
            tokens_per_s REAL,
            status INTEGER NOT NULL,
            error TEXT,
            stream INTEGER NOT NULL DEFAULT 0,
            attempts TEXT,
            redactions TEXT,
            remote_model TEXT,
            remote_latency_ms REAL,
            cost_usd REAL
        )
        """
    )
    db.execute("CREATE INDEX idx_traces_created_at ON traces (created_at)")
    db.execute("CREATE INDEX idx_traces_task ON traces (task, seq)")
    db.execute("CREATE INDEX idx_traces_route ON traces (route, seq)")
    db.execute("CREATE INDEX idx_traces_status ON traces (status, seq)")
    db.execute("CREATE INDEX idx_traces_session ON traces (session_id)")
    db.execute(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            agent TEXT,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            request_count INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute(
        """
        CREATE TABLE feedback (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            trace_id TEXT NOT NULL REFERENCES traces(id),
            created_at TEXT NOT NULL,
            rating TEXT CHECK (rating IN ('good', 'bad') OR rating IS NULL),
            correction TEXT,
            comment TEXT,
            source TEXT
        )
        """
    )
    db.execute("CREATE INDEX idx_feedback_trace ON feedback (trace_id)")
    # Agent runs and their steps, one span each (a run is the span with no parent).
    db.execute(
        """
        CREATE TABLE spans (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            run_id TEXT NOT NULL,
            parent_id TEXT,
            step INTEGER,
            kind TEXT NOT NULL,
            name TEXT,
            route TEXT,
            status TEXT NOT NULL,
            trace_id TEXT,
            input TEXT,
            output TEXT,
            error TEXT,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            duration_ms REAL
        )
        """
    )
    db.execute("CREATE INDEX idx_spans_run ON spans (run_id, seq)")


@migration
def m002_sync_state(db: sqlite_utils.Database) -> None:
    # The ids live in the trace database itself: (store_id, seq) names a trace for ever, so a
    # fresh database can never be mistaken for one the collector has already seen.
    db.execute("CREATE TABLE sync_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO sync_meta (key, value) VALUES ('store_id', lower(hex(randomblob(8))))")
    db.execute("INSERT INTO sync_meta (key, value) VALUES ('device_id', 'dev-' || lower(hex(randomblob(6))))")
    # One cursor per sync target: the highest seq the target acknowledged, and the upper bounds
    # of the batch in flight, so a retry after a crash resends exactly the same batch.
    db.execute(
        """
        CREATE TABLE sync_state (
            target TEXT PRIMARY KEY,
            trace_seq INTEGER NOT NULL DEFAULT 0,
            feedback_seq INTEGER NOT NULL DEFAULT 0,
            pending_trace_seq INTEGER,
            pending_feedback_seq INTEGER,
            pushed_traces INTEGER NOT NULL DEFAULT 0,
            pushed_feedback INTEGER NOT NULL DEFAULT 0,
            last_attempt_at TEXT,
            last_success_at TEXT,
            last_error TEXT
        )
        """
    )


@migration
def m003_task_matching_and_shadow(db: sqlite_utils.Database) -> None:
    # Every chat request is matched to a task; the trace keeps how (explicit, signature,
    # embedding) and how sure, and the template signature discovery groups calls by.
    db.execute("ALTER TABLE traces ADD COLUMN match_method TEXT")
    db.execute("ALTER TABLE traces ADD COLUMN match_score REAL")
    db.execute("ALTER TABLE traces ADD COLUMN signature TEXT")
    db.execute("CREATE INDEX idx_traces_signature ON traces (signature)")
    # A task's adapter on live traffic: shadow -> live -> demoted, and every pair that decided it.
    db.execute(
        """
        CREATE TABLE task_states (
            task TEXT PRIMARY KEY,
            adapter TEXT,
            state TEXT NOT NULL,
            reason TEXT,
            changed_at TEXT NOT NULL,
            gate TEXT
        )
        """
    )
    db.execute(
        """
        CREATE TABLE task_transitions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            task TEXT NOT NULL,
            adapter TEXT,
            from_state TEXT,
            to_state TEXT NOT NULL,
            reason TEXT NOT NULL,
            at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE shadow_pairs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            trace_id TEXT NOT NULL,
            task TEXT NOT NULL,
            adapter TEXT,
            created_at TEXT NOT NULL,
            kind TEXT NOT NULL,
            agreed INTEGER,
            score REAL,
            local_output TEXT,
            remote_output TEXT,
            features TEXT,
            local_ms REAL,
            remote_ms REAL,
            error TEXT
        )
        """
    )
    db.execute("CREATE INDEX idx_shadow_pairs_task ON shadow_pairs (task, adapter, seq)")


@migration
def m004_responses(db: sqlite_utils.Database) -> None:
    # Responses API answers kept for GET and previous_response_id: the conversation answered and
    # the response, as JSON, linked to the chat trace that produced it.
    db.execute(
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            trace_id TEXT,
            model TEXT NOT NULL,
            previous_response_id TEXT,
            input TEXT NOT NULL,
            response TEXT NOT NULL
        )
        """
    )


@migration
def m005_constraint_engine(db: sqlite_utils.Database) -> None:
    # Which engine constrained a local answer (llguidance, or the GBNF fallback): a slow or odd
    # structured answer is explained by its row.
    db.execute("ALTER TABLE traces ADD COLUMN constraint_engine TEXT")
